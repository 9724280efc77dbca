"""Structured pruning mechanics: whole channels and neurons cut with torch-pruning's dependency graph.

The graph couples every layer a channel flows through (depthwise and grouped convolutions,
squeeze-excitation, residual adds), so a cut keeps the model consistent; ``round_to`` keeps
channel counts at multiples mobile kernels prefer.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress import measure
from compress.models import forward_problem
from compress.pruning import allocation
from compress.pruning.masks import LAYER_TYPES

if TYPE_CHECKING:
    import torch_pruning as tp


# More channel indices than any layer of an image model has (VGG's flattened 512x7x7 is 25,088;
# a 64-channel 224 px map flattened is 3.2 M)
MAX_INDICES = 1 << 22


class IndexExplosion(RuntimeError):
    """torch-pruning's flatten index mapping grew past ``MAX_INDICES``."""


@functools.cache
def _torch_pruning():
    """torch-pruning, imported on first use: it pulls in timm and torchvision (about 3 s), which
    a ``--validate`` or any run without structured pruning never needs.

    Its flatten index mapping multiplies a group's indices by the flattened size at every
    reshape it passes; through Swin's window partitions (reshape after reshape) that is 32, 1 K,
    32 K, 1 M, 32 M... indices, and tracing swin_t ate 6 GB in a minute before the kernel killed
    it. A guard raises once a mapping would exceed ``MAX_INDICES``, so the model is refused as
    untraceable within seconds; real mappings stay far below it.
    """
    import torch_pruning
    from torch_pruning.dependency import index_mapping

    flatten = index_mapping._FlattenIndexMapping
    unguarded = flatten.__call__

    def guarded(self, idxs):  # noqa: ANN001, ANN202 - torch-pruning's signature
        if not self.reverse and len(idxs) * self._stride > MAX_INDICES:
            raise IndexExplosion(
                f"a flatten maps {len(idxs)} channel indices to {len(idxs) * self._stride} (reshapes "
                "torch-pruning cannot follow, e.g. window attention)"
            )
        return unguarded(self, idxs)

    flatten.__call__ = guarded
    return torch_pruning


log = logging.getLogger("compress.pruning")


@functools.cache
def _pruner_class() -> type:
    """torch-pruning's BasePruner, with the channel grouping every coupled layer can take.

    A dependency group through GroupNorm(4, C) and a convolution of 3 groups must keep a
    multiple of 12 channels; torch-pruning 1.6 takes the largest of the group counts (4), so
    the convolution ends with a width it cannot split and the model fails in its first forward.
    The least common multiple keeps every count valid: channels are cut at the same offset in
    each of that many equal slices, which is a whole cut in every GroupNorm group and in every
    convolution group.
    """
    tp = _torch_pruning()

    class Pruner(tp.pruner.BasePruner):
        def _get_channel_groups(self, group) -> int:  # noqa: ANN001 - torch-pruning's Group
            counts = []
            for dep, _ in group:
                out = self.DG.is_out_channel_pruning_fn(dep.handler)
                known = self.out_channel_groups if out else self.in_channel_groups
                if dep.target.module in known:
                    counts.append(int(known[dep.target.module]))
            return math.lcm(*counts) if counts else 1

    return Pruner


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
            return _pruner_class()(
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
        _check_runs(model, example)


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """A cut the dependency graph allowed can still break a reshape it did not follow (timm's
    MobileViT); UntraceableModel then, which the prune stage reports in one line."""
    problem = forward_problem(model, example)
    if problem is not None:
        raise UntraceableModel(
            f"the channel-pruned model cannot run ({problem}); use method: magnitude for it, or "
            "exclude the layers involved"
        )


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
        _check_runs(model, example)
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
