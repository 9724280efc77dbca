"""Finding the parts of any model that stages treat specially: its stem and its classifier.

Users bring models whose classifier is called ``fc`` (ResNet, RegNet), ``classifier.3``
(MobileNetV3), ``head`` (timm) or anything else, so names cannot be assumed. One forward
pass of an example with hooks on every layer says which layer the input meets first and which
layer produces the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.measure import run_hooked

WEIGHTED = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class Anatomy:
    """Layer names in the order a forward pass first calls them, and the landmarks among them."""

    order: list[str]
    stem: str | None  # the first convolution the input meets
    stem_pool: str | None  # a max-pool between the stem and the next convolution
    classifier: str | None  # the last Linear/Conv2d layer whose output has one channel per class


def inspect(model: nn.Module, example: torch.Tensor, num_classes: int | None = None) -> Anatomy:
    """Run ``example`` through ``model`` (eval mode, no grad) and record the call order."""
    modules = dict(model.named_modules())
    order: list[str] = []
    outputs: dict[str, int | None] = {}

    def hook(name: str):  # noqa: ANN202 - a forward hook
        def record(module: nn.Module, args: object, output: object) -> None:
            if name not in outputs:
                order.append(name)
                shaped = isinstance(output, torch.Tensor) and output.dim() > 1
                outputs[name] = output.shape[1] if shaped else None

        return record

    leaves = {m: hook(n) for n, m in modules.items() if n and not any(True for _ in m.children())}
    run_hooked(model, example, leaves)
    convs = [n for n in order if isinstance(modules[n], nn.Conv2d)]
    stem = convs[0] if convs else None
    stem_pool = None
    if stem is not None:
        after = order[order.index(stem) + 1 : order.index(convs[1]) if len(convs) > 1 else len(order)]
        stem_pool = next((n for n in after if isinstance(modules[n], nn.MaxPool2d)), None)
    weighted = [n for n in order if isinstance(modules[n], WEIGHTED)]
    classifier = None
    if weighted:
        last = weighted[-1]
        if num_classes is None or outputs.get(last) == num_classes:
            classifier = last
    return Anatomy(order, stem, stem_pool, classifier)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted path) is."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
