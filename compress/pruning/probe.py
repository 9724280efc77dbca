"""Slimming an architecture once before anything trains, to refuse it in one line if it cannot work.

Whether structured pruning can handle an architecture does not depend on its weights: the
dependency graph must trace, the cut model must still run, and the cut model must rebuild from
a model file (spec + state dict) with the same outputs. An untrained model cut as far as the
plan allows answers all three in seconds, so ``--validate`` refuses ShuffleNet (torch-pruning
cannot trace its channel shuffle) or Swin instead of a stage failing an hour into a run; the
same cut gives the largest MACs reduction the architecture allows.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress import measure
from compress.models import apply_state, build_model, forward_problem
from compress.models.files import conv_groups, state_metadata, with_metadata
from compress.models.zoo import ModelSpec
from compress.pruning.channels import ChannelPlan, UntraceableModel, prune_to_macs, structured_prune

UNIFORM_PROBE = 0.3
ADVICE = "use method: magnitude for it, or exclude the layers involved"


def slim_problem(
    spec: ModelSpec, model: nn.Module, example: torch.Tensor, plan: ChannelPlan
) -> tuple[float | None, str | None]:
    """(the largest MACs reduction, why slimming ``model`` cannot work or None).

    Two cuts of copies: every prunable group to ``max_layer_amount`` by MACs (the limit, the
    most any scope cuts), and an even ``UNIFORM_PROBE`` in every group (timm's MobileViT
    survives the first and not the second: its patch reshapes need some widths whole).
    """
    limit = None
    for scope in ("macs", "uniform"):
        trial = copy.deepcopy(model).eval()
        trial_plan = ChannelPlan(**{**plan.__dict__, "scope": scope})
        try:
            if scope == "macs":
                before = measure.count_macs(trial, example).macs
                limit = before / max(1, prune_to_macs(trial, example, 0, trial_plan, rounds=1))
            else:
                structured_prune(trial, example, UNIFORM_PROBE, trial_plan)
        except UntraceableModel as exc:
            return limit, str(exc)
        except Exception as exc:  # noqa: BLE001 - torch-pruning's own failure, reported in one line
            return limit, f"torch-pruning fails on it ({_first_line(exc)}); {ADVICE}"
        problem = forward_problem(trial, example)
        if problem is not None:
            return limit, f"its channel-pruned copy cannot run ({problem}); {ADVICE}"
        problem = _rebuild_problem(spec, trial, example)
        if problem is not None:
            return limit, problem
    return limit, None


def _rebuild_problem(spec: ModelSpec, pruned: nn.Module, example: torch.Tensor) -> str | None:
    """Why ``pruned`` does not come back from a model file with the same outputs, or None."""
    state = pruned.state_dict()
    try:
        rebuilt = build_model(spec)
        apply_state(rebuilt, with_metadata(dict(state), state_metadata(state)), conv_groups(pruned))
        with torch.no_grad():
            same = torch.allclose(rebuilt.eval()(example), pruned(example), atol=1e-5, rtol=1e-4)
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild, in one line
        return f"its channel-pruned copy does not rebuild from a model file ({_first_line(exc)}); {ADVICE}"
    if not same:
        return f"its channel-pruned copy rebuilt from a model file gives other outputs; {ADVICE}"
    return None


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
