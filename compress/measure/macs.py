"""Multiply-accumulates (MACs) per image, counted from the shapes seen by forward hooks on
Conv/Linear layers (bias adds and activations are not MACs, by the usual convention), and the
one hooked forward pass that observes layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class MacCount:
    """Per-image multiply-accumulates of Conv and Linear layers.

    ``nonzero_macs`` counts only the MACs whose weight is non-zero: what a sparse kernel
    would have to do, and an upper bound on what pruning can save.
    """

    macs: int
    nonzero_macs: int
    layers: dict[str, int]


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_macs(model: nn.Module, sample: torch.Tensor) -> MacCount:
    """Run ``sample`` (any batch size) through ``model`` and count MACs per image."""
    batch = sample.shape[0]
    layers: dict[str, int] = {}
    nonzero = 0

    def hook(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            nonlocal nonzero
            weight = module.weight.detach()
            if isinstance(module, _CONV):
                # each output element reads in_channels/groups * prod(kernel) weights
                per_output = weight[0].numel()
                positions = output.numel() // batch // weight.shape[0]
                macs = positions * weight.shape[0] * per_output
                nz = positions * int(torch.count_nonzero(weight))
            else:  # Linear: every leading position multiplies the full weight matrix
                positions = output.numel() // batch // weight.shape[0]
                macs = positions * weight.numel()
                nz = positions * int(torch.count_nonzero(weight))
            layers[name] = layers.get(name, 0) + macs
            nonzero += nz

        return record

    hooked = {m: hook(n) for n, m in model.named_modules() if isinstance(m, (*_CONV, nn.Linear))}
    run_hooked(model, sample, hooked)
    return MacCount(macs=sum(layers.values()), nonzero_macs=nonzero, layers=layers)


def run_hooked(model: nn.Module, sample: torch.Tensor, hooks: dict[nn.Module, Callable[..., None]]) -> None:
    """One eval-mode, no-grad forward pass of ``sample`` with forward ``hooks`` on some layers
    (removed afterwards, the model's train/eval mode restored): how layers are observed here."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
