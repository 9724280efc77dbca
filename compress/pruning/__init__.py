"""Pruning, apart from the stage's YAML: the mechanics and the two jobs the ``prune`` stage runs.

``masks`` (unstructured: global L1 masks, the gradual schedule) and ``channels`` (structured:
torch-pruning's dependency graph, reaching a MACs target) and ``allocation`` (channels
allocated by importance per MAC saved) know *how* to prune, and ``probe`` (an untrained copy
slimmed, run and rebuilt) tells before any work whether an architecture can be slimmed; the jobs
``magnitude_job`` and ``structured_job`` prune, fine-tune, save and measure one model, sharing
what ``job`` defines. The ``prune`` stage (``compress/stages/prune.py``) checks the settings and
picks the job.
"""

from compress.pruning.channels import (
    ChannelPlan,
    UntraceableModel,
    make_importance,
    max_macs_reduction,
    prune_to_macs,
    ratio_for_macs,
    structured_prune,
)
from compress.pruning.masks import (
    LAYER_TYPES,
    GradualPruner,
    apply_masks,
    cubic_sparsity,
    event_schedule,
    layer_sparsity,
    magnitude_masks,
    prunable_layers,
)

__all__ = [
    "LAYER_TYPES",
    "ChannelPlan",
    "GradualPruner",
    "UntraceableModel",
    "apply_masks",
    "cubic_sparsity",
    "event_schedule",
    "layer_sparsity",
    "magnitude_masks",
    "make_importance",
    "max_macs_reduction",
    "prunable_layers",
    "prune_to_macs",
    "ratio_for_macs",
    "structured_prune",
]
