"""How many channels each layer gives up for a MACs target, chosen against what each channel costs.

One global ratio over a global importance ranking (torch-pruning's global scope) removes the
least important channels first, wherever they are. Those need not be the channels that carry
the MACs: on LeNet-5 trained on Fashion-MNIST the 500 cheap neurons of ``fc1`` ranked lowest, hit
``max_layer_amount`` and left the convolutions whole, so no ratio reached 2x, although the
architecture allows far more. Here every dependency group (the channels torch-pruning couples
through residual adds, depthwise convolutions and squeeze-excitation) is priced: the MACs one
of its channels costs in every layer it touches. Channels are then taken greedily by importance
per MAC saved (the least important per MAC first), each layer at most ``max_layer_amount`` of its
channels, until the target is met. MACs are counted again after each cut and the plan repeated
for what is left, since pruning both sides of a layer saves less than the two estimates added.
Any target the architecture can reach (every layer at ``max_layer_amount``) is reached on any
weights; ``max_macs_reduction`` tells from the architecture alone what that limit is.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress import measure

if TYPE_CHECKING:  # annotations only: torch-pruning is imported where a model is pruned
    import torch_pruning as tp


@dataclass
class GroupPrice:
    """One dependency group: its root layer, its units (channels, or channel slices shared by the
    groups of a grouped convolution), their importance ascending (``order``: unit indices in that
    order), and the MACs one unit costs."""

    name: str
    root: nn.Module
    handler: object  # torch-pruning's pruning function of the root
    units: int
    channel_groups: int
    order: list[int]
    importance: list[float]
    macs_per_unit: float


def price_groups(pruner: tp.pruner.BasePruner, model: nn.Module, example: torch.Tensor) -> list[GroupPrice]:
    """Every prunable group of ``pruner``'s graph, priced with the per-layer MACs of ``model``.

    A unit's cost in one layer is the layer's MACs times the share of that layer's input or
    output dimension the unit takes (a conv channel feeding a flattened Linear takes its H*W
    inputs); a layer met twice in a group (a depthwise conv's input and output) counts once.
    """
    layer_macs = measure.count_macs(model, example).layers
    names = {module: name for name, module in model.named_modules()}
    graph = pruner.DG
    prices = []
    for group in graph.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        imp = pruner.estimate_importance(group)
        if imp is None:
            continue
        ch_groups = pruner._get_channel_groups(group)
        unit_imp = imp.view(ch_groups, -1).mean(dim=0) if ch_groups > 1 else imp
        units = len(unit_imp)
        shares: dict[nn.Module, float] = {}
        for dep, idxs in group:
            module = dep.target.module
            if not isinstance(module, nn.Conv2d | nn.Linear) or names.get(module) not in layer_macs:
                continue
            out = graph.is_out_channel_pruning_fn(dep.handler)
            dim = graph.get_out_channels(module) if out else graph.get_in_channels(module)
            if dim:
                shares[module] = max(shares.get(module, 0.0), len(idxs) / dim)
        cost = sum(layer_macs[names[m]] * share for m, share in shares.items()) / units
        root = group[0].dep.target.module
        order = torch.argsort(unit_imp).tolist()
        ranked = unit_imp[order].tolist()
        name = names.get(root, "?")
        prices.append(
            GroupPrice(name, root, group[0].dep.handler, units, ch_groups, order, ranked, max(cost, 1e-9))
        )
    return prices


def allocate(prices: list[GroupPrice], needed_macs: float, caps: dict[str, int]) -> dict[str, int]:
    """Units to remove per group: the least importance per MAC first, until ``needed_macs`` are
    saved by estimate or every group is at its cap (``caps``: units a group may still lose)."""
    cut = {p.name: 0 for p in prices}
    heap = [(p.importance[0] / p.macs_per_unit, i) for i, p in enumerate(prices) if caps.get(p.name, 0) > 0]
    heapq.heapify(heap)
    saved = 0.0
    while heap and saved < needed_macs:
        _, i = heapq.heappop(heap)
        price = prices[i]
        cut[price.name] += 1
        saved += price.macs_per_unit
        taken = cut[price.name]
        if taken < min(caps[price.name], price.units - 1):
            heapq.heappush(heap, (price.importance[taken] / price.macs_per_unit, i))
    return {name: n for name, n in cut.items() if n}


def apply_cut(
    pruner: tp.pruner.BasePruner, prices: list[GroupPrice], cut: dict[str, int], round_to: int | None
) -> None:
    """Remove each group's ``cut`` least important units in place, through ``pruner``'s graph (the
    importance was taken before any cut, as torch-pruning's own step does). ``round_to`` rounds
    the units a group keeps down to a multiple, as torch-pruning does."""
    for price in prices:
        removed = cut.get(price.name, 0)
        if not removed:
            continue
        keep = price.units - removed
        if round_to and keep > round_to:
            keep -= keep % round_to
        chosen = price.order[: price.units - keep]
        idxs = [i + g * price.units for g in range(price.channel_groups) for i in chosen]
        pruner.DG.get_pruning_group(price.root, price.handler, idxs).prune()


def unit_caps(prices: list[GroupPrice], max_amount: float, original: dict[str, int]) -> dict[str, int]:
    """Units each group may still lose: ``max_amount`` of what it had before any cut, one kept."""
    caps = {}
    for p in prices:
        first = original.setdefault(p.name, p.units)
        allowed = min(math.floor(max_amount * first + 1e-9), first - 1)
        caps[p.name] = max(0, allowed - (first - p.units))
    return caps
