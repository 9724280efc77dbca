"""Unstructured pruning mechanics: which layers, how sparse, global L1 masks and their schedule.

``torch.nn.utils.prune`` chooses the global L1 masks and its re-parametrisation is removed at
once, so a model's state dict always holds plain weights with real zeros; the masks live beside
it and are re-applied after every optimizer step (``GradualPruner``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

LAYER_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


# ------------------------------------------------------------------ layers and counts


def prunable_layers(
    model: nn.Module, layer_types: list[str], exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """Modules of the given types, by name, minus ``exclude`` (layer names; their sublayers too)."""
    kinds = tuple(LAYER_TYPES[t] for t in layer_types)
    skipped = set(exclude)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, kinds) and name not in skipped and not _under(name, skipped)
    }


def _under(name: str, parents: set[str]) -> bool:
    return any(name.startswith(f"{p}.") for p in parents)


def layer_sparsity(layers: dict[str, nn.Module]) -> tuple[float, dict[str, float]]:
    """Overall fraction of zero weights across ``layers`` and the fraction in each."""
    zeros = total = 0
    per_layer: dict[str, float] = {}
    for name, module in layers.items():
        w = module.weight.detach()
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros += z
        total += w.numel()
    return zeros / max(total, 1), per_layer


# ------------------------------------------------------------------ unstructured masks


def cubic_sparsity(initial: float, final: float, step: int, steps: int) -> float:
    """Zhu & Gupta's gradual schedule: s_t = s_f + (s_i - s_f) (1 - t/n)^3, t = 1..n."""
    return final + (initial - final) * (1 - step / steps) ** 3


def magnitude_masks(
    layers: dict[str, nn.Module], sparsity: float, limits: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Global L1 masks zeroing ``sparsity`` of all weights in ``layers``, each layer capped.

    A layer whose share under the global threshold would exceed its cap (``limits``) is pruned
    locally to the cap; the rest of the budget is spread over the others by a global threshold
    (``prune.global_unstructured``), repeated until no cap is exceeded. The re-parametrisation
    is removed again, leaving plain weights with zeros; the masks are returned.
    """
    with _standard_layout(layers):
        return _magnitude_masks(layers, sparsity, limits)


@contextmanager
def _standard_layout(layers: dict[str, nn.Module]) -> Iterator[None]:
    """Weights in the standard (contiguous) layout for the block, then back in their own strides.

    ``fit`` trains conv nets in channels-last memory (``compress.layout``), and
    ``torch.nn.utils.prune``'s global threshold flattens weights with ``view``, which only a
    contiguous tensor allows. The exact strides come back too: a 1-input-channel conv weight
    is "contiguous" in both layouts, but left with the standard strides it makes oneDNN run
    that conv in the slow layout and convert every batch (LeNet-5's gradual pruning trained
    1.6x slower).
    """
    originals = {name: module.weight.data for name, module in layers.items()}
    for module in layers.values():
        module.weight.data = module.weight.data.contiguous()
    try:
        yield
    finally:
        for name, module in layers.items():
            if module.weight.stride() != originals[name].stride():
                module.weight.data = torch.empty_like(originals[name]).copy_(module.weight.data)


def _magnitude_masks(
    layers: dict[str, nn.Module], sparsity: float, limits: dict[str, float]
) -> dict[str, torch.Tensor]:
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    budget = int(round(sparsity * sum(sizes.values())))
    capped: dict[str, int] = {}
    while True:
        free = [n for n in layers if n not in capped]
        left = max(0, min(budget - sum(capped.values()), sum(sizes[n] for n in free)))
        chosen = _global_counts({n: layers[n] for n in free}, left)
        over = [n for n in free if chosen[n] > math.floor(limits.get(n, 1.0) * sizes[n])]
        if not over:
            break
        for n in over:
            capped[n] = math.floor(limits[n] * sizes[n])
    for n, count in capped.items():
        prune.l1_unstructured(layers[n], "weight", amount=count)
    free = [n for n in layers if n not in capped]
    if free:
        prune.global_unstructured(
            [(layers[n], "weight") for n in free],
            pruning_method=prune.L1Unstructured,
            amount=left,
        )
    masks = {}
    for n, module in layers.items():
        masks[n] = module.weight_mask.detach().clone().bool()
        prune.remove(module, "weight")
    return masks


def _global_counts(layers: dict[str, nn.Module], k: int) -> dict[str, int]:
    """How many of the ``k`` globally smallest |w| fall in each layer."""
    if not layers or k <= 0:
        return dict.fromkeys(layers, 0)
    flat = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
    idx = torch.topk(flat, k, largest=False).indices
    owner = torch.repeat_interleave(
        torch.arange(len(layers)), torch.tensor([m.weight.numel() for m in layers.values()])
    )
    counts = torch.bincount(owner[idx], minlength=len(layers))
    return {n: int(c) for n, c in zip(layers, counts, strict=True)}


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            weight = layers[name].weight
            weight.mul_(mask.to(weight.device, weight.dtype))


@dataclass
class GradualPruner:
    """The ``after_step`` hook of ``training.fit`` for Zhu & Gupta gradual pruning.

    Pruning events happen before training (event 0) and after optimizer steps
    ``event_iters[1:]``; between events the current masks are re-applied after every step
    so pruned weights stay exactly zero. ``resume`` restores masks and the step counter from a
    checkpoint's weights, so the schedule continues where a killed run stopped.
    """

    layers: dict[str, nn.Module]
    sparsities: list[float]
    event_iters: list[int]
    limits: dict[str, float] = field(default_factory=dict)
    iteration: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    on_event: Callable[[int, float], None] | None = None

    def start(self) -> None:
        self.masks = magnitude_masks(self.layers, self.sparsities[0], self.limits)
        if self.on_event:
            self.on_event(0, self.sparsities[0])

    def resume(self, state: dict[str, torch.Tensor], iteration: int) -> None:
        self.masks = {n: state[f"{n}.weight"] != 0 for n in self.layers}
        self.iteration = iteration

    def __call__(self) -> None:
        self.iteration += 1
        apply_masks(self.layers, self.masks)
        for k in range(1, len(self.event_iters)):
            if self.event_iters[k] == self.iteration:
                self.masks = magnitude_masks(self.layers, self.sparsities[k], self.limits)
                if self.on_event:
                    self.on_event(k, self.sparsities[k])


def event_schedule(
    initial: float, final: float, steps: int, total_iters: int, ramp: float
) -> tuple[list[float], list[int]]:
    """Sparsity after each of ``steps`` events and the optimizer step each follows.

    Events are evenly spaced over the first ``ramp`` of training (event 0 before training);
    the rest of training recovers at the final sparsity.
    """
    sparsities = [cubic_sparsity(initial, final, k + 1, steps) for k in range(steps)]
    span = ramp * total_iters
    iters = [int(round(k * span / steps)) for k in range(steps)]
    for k in range(1, steps):  # strictly increasing even for tiny runs
        iters[k] = max(iters[k], iters[k - 1] + 1)
    return sparsities, iters
