"""Structured pruning mechanics: whole channels and neurons cut with torch-pruning's dependency graph.

The graph couples every layer a channel flows through (depthwise and grouped convolutions,
squeeze-excitation, residual adds), so a cut keeps the model consistent; ``round_to`` keeps
channel counts at multiples mobile kernels prefer.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress import measure
from compress.pruning import allocation
from compress.pruning.masks import LAYER_TYPES

if TYPE_CHECKING:
    import torch_pruning as tp


def _torch_pruning():
    """torch-pruning, imported on first use: it pulls in timm and torchvision (about 3 s), which
    a ``--validate`` or any run without structured pruning never needs."""
    import torch_pruning

    return torch_pruning


log = logging.getLogger("compress.pruning")


def make_importance(kind: str) -> tp.importance.Importance:
    """l1/l2: the norm of each channel's own weights; group_norm: the L2 norm over every
    coupled parameter of the dependency group (DepGraph's group importance)."""
    tp = _torch_pruning()
    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer="mean")
    if kind == "l2":
        return tp.importance.MagnitudeImportance(p=2, group_reduction="first", normalizer="mean")
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")


class UntraceableModel(ValueError):
    """torch-pruning's dependency graph cannot be built for the model."""


@dataclass
class ChannelPlan:
    importance: str
    scope: str  # "macs" | "global" | "uniform"
    max_layer_amount: float
    ignored: list[str]  # module names torch-pruning must not use as group roots
    layer_types: list[str]
    round_to: int | None = None


def _pruner(
    model: nn.Module,
    example: torch.Tensor,
    plan: ChannelPlan,
    ratio: float = 0.0,
    ratios: dict[nn.Module, float] | None = None,
) -> tp.pruner.BasePruner:
    """torch-pruning's pruner for ``plan``: one ``ratio`` over the plan's scope, or a ratio per
    group root (``ratios``, each group ranked on its own)."""
    modules = dict(model.named_modules())
    kinds = tuple(LAYER_TYPES[t] for t in plan.layer_types)
    ignored = [modules[n] for n in plan.ignored if n in modules]
    ignored += [
        m for m in modules.values() if isinstance(m, nn.Linear | nn.Conv2d) and not isinstance(m, kinds)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _torch_pruning().pruner.BasePruner(
                model,
                example,
                importance=make_importance(plan.importance),
                global_pruning=plan.scope == "global" and ratios is None,
                pruning_ratio=min(ratio, 1.0),
                pruning_ratio_dict=ratios,
                max_pruning_ratio=plan.max_layer_amount,
                ignored_layers=ignored,
                round_to=plan.round_to,
            )
        except Exception as exc:  # torch-pruning cannot trace some ops (e.g. ShuffleNet's channel shuffle)
            raise UntraceableModel(
                f"torch-pruning cannot trace this model's channel dependencies ({type(exc).__name__}: "
                f"{str(exc)[:200]}); use method: magnitude for it, or exclude the layers involved"
            ) from exc


def _step(pruner: tp.pruner.BasePruner) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        pruner.step()


def structured_prune(model: nn.Module, example: torch.Tensor, ratio: float, plan: ChannelPlan) -> None:
    """Remove ``ratio`` of the prunable channels/neurons of ``model`` in place (the plan's scope
    ``global`` or ``uniform``)."""
    if ratio > 0:
        _step(_pruner(model, example, plan, ratio))


def prune_to_macs(
    model: nn.Module, example: torch.Tensor, target_macs: float, plan: ChannelPlan, rounds: int = 30
) -> int:
    """Cut channels of ``model`` in place until it has at most ``target_macs``; returns its MACs.

    Scope ``macs`` allocates channels by importance per MAC saved (``allocation``); ``global``
    and ``uniform`` search one ratio, and fall back to that allocation when their ranking cannot
    get there (``global``: the lowest-ranked channels may be cheap ones). More than
    ``target_macs`` comes back only when the architecture cannot reach it.
    """
    if plan.scope != "macs":
        ratio, reached = ratio_for_macs(model, example, target_macs, plan)
        if reached <= target_macs:
            structured_prune(model, example, ratio, plan)
            return measure.count_macs(model, example).macs
        log.info(
            "prune: scope %s reaches only %d MACs (target %d); allocating channels by MACs instead",
            plan.scope,
            reached,
            int(target_macs),
        )
    original: dict[str, int] = {}
    macs = measure.count_macs(model, example).macs
    for _ in range(rounds):
        if macs <= target_macs:
            break
        pruner = _pruner(model, example, plan)
        prices = allocation.price_groups(pruner, model, example)
        cut = allocation.allocate(
            prices, macs - target_macs, allocation.unit_caps(prices, plan.max_layer_amount, original)
        )
        if not cut:
            break
        with torch.no_grad():
            allocation.apply_cut(pruner, prices, cut, plan.round_to)
        macs = measure.count_macs(model, example).macs
    return macs


def max_macs_reduction(model: nn.Module, example: torch.Tensor, plan: ChannelPlan) -> float:
    """The largest MACs reduction the architecture allows: every prunable group of a copy of
    ``model`` cut to ``max_layer_amount`` (the classifier and ignored layers whole). Weights do
    not matter, so an untrained model answers for a trained one."""
    trial = copy.deepcopy(model)
    before = measure.count_macs(trial, example).macs
    reached = prune_to_macs(trial, example, 0, replace(plan, scope="macs"), rounds=1)
    return before / max(1, reached)


def ratio_for_macs(
    model: nn.Module, example: torch.Tensor, target_macs: float, plan: ChannelPlan, iters: int = 10
) -> tuple[float, int]:
    """The smallest channel ratio whose pruned copy of ``model`` has at most ``target_macs``.

    Returns (ratio, MACs at that ratio); if even the largest allowed ratio misses the target,
    returns that ratio and its MACs so the caller can report what is reachable.
    """

    def macs_at(ratio: float) -> int:
        trial = copy.deepcopy(model)
        structured_prune(trial, example, ratio, plan)
        return measure.count_macs(trial, example).macs

    high = plan.max_layer_amount
    high_macs = macs_at(high)
    if high_macs > target_macs:
        return high, high_macs
    low = 0.0
    for _ in range(iters):
        mid = (low + high) / 2
        mid_macs = macs_at(mid)
        if mid_macs <= target_macs:
            high, high_macs = mid, mid_macs
        else:
            low = mid
    return high, high_macs
