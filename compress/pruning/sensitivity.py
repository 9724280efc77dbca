"""Distiller's sensitivity analysis for magnitude pruning: each layer alone pruned to the target.

Global magnitude pruning gives each layer the sparsity one threshold leaves it; that says little
about which layers *can* take it. Pruning one layer at a time to the stage's sparsity, all
others dense, and measuring the validation drop without fine-tuning shows which layers hurt
(a large drop: exclude it, or give it a ``layer_sparsity_limits`` entry), beside the sparsity
the shipped variant ended with in that layer.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from compress.measure import drop_pp
from compress.pruning import masks

log = logging.getLogger("compress.pruning")


def layer_sensitivity(
    model: nn.Module,
    layers: list[str],
    sparsity: float,
    val_accuracy: Callable[[nn.Module], float],
    reference_val: float,
) -> list[dict[str, Any]]:
    """One row per layer, in ``layers`` order: its validation accuracy and drop (pp) when only it
    is magnitude-pruned to ``sparsity``; ``model`` itself is left untouched."""
    rows = []
    for name in layers:
        probe = copy.deepcopy(model)
        masks.magnitude_masks({name: probe.get_submodule(name)}, sparsity, {})
        accuracy = val_accuracy(probe)
        rows.append(
            {
                "layer": name,
                "sparsity": sparsity,
                "val_accuracy": accuracy,
                "drop_pp": round(drop_pp(reference_val, accuracy), 3),
            }
        )
    log.info(
        "prune: per-layer drop when pruned alone to %.3f: %s",
        sparsity,
        ", ".join(f"{r['layer']} {r['drop_pp']:.2f} pp" for r in rows),
    )
    return rows
