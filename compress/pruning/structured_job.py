"""The structured (channel) pruning job: torch-pruning removes whole channels, then fine-tuning.

The model is physically smaller (fewer MACs and parameters), and reloads from its spec and
state dict with the new channel counts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import measure
from compress.fileio import read_json, write_json
from compress.models import load_model, save_model
from compress.pruning import channels
from compress.pruning.job import PruneJob, PruneProblem, PruneSpec, accuracies, adapt_unfinetuned, model_name
from compress.variants import StageResult


def run_structured(job: PruneJob) -> StageResult:
    """Cut channels to the MACs target (or ``amount``), in ``steps`` each followed by fine-tuning.

    Finished steps are saved with their record, so a killed run resumes after the last one.
    """
    cfg, ctx, example = job.cfg, job.ctx, job.example
    plan = _channel_plan(cfg, job.kept)
    model = job.model.cpu()
    macs0, params0 = measure.count_macs(model, example).macs, measure.count_parameters(model)
    target = macs0 / cfg.target_macs_reduction if cfg.target_macs_reduction else None
    if target is not None:
        limit = channels.max_macs_reduction(model, example, plan)
        if limit < cfg.target_macs_reduction:
            raise PruneProblem("target_macs_reduction", unreachable(cfg, job.spec, limit))
    before = accuracies(model.to(ctx.device), job)
    just_pruned = _one_shot_accuracy(job, model, plan, target)

    model, done, history, batchnorm = _prune_in_steps(job, model, plan, macs0, target)
    ft = cfg.finetune
    if cfg.final_finetune and ft is not None:
        final = ft.model_copy(update={"epochs": cfg.final_finetune})
        result = job.finetune(model, final, job.out_dir / "work" / "final", f"{cfg.label} final")
        history += result.history
        batchnorm = result.batchnorm
    if ft is None:  # removed channels shift every later layer's inputs; nothing re-estimated them
        batchnorm = adapt_unfinetuned(model, job)

    return _structured_result(
        job,
        model,
        macs0=macs0,
        params0=params0,
        before=before,
        just_pruned=just_pruned,
        done=done,
        history=history,
        batchnorm=batchnorm,
    )


def _channel_plan(cfg: PruneSpec, kept: list[str]) -> channels.ChannelPlan:
    """The stage's channel settings, with the layers kept whole (classifier, ``exclude``) ignored."""
    return channels.ChannelPlan(
        importance=cfg.importance,
        scope=cfg.channel_scope,
        max_layer_amount=cfg.max_layer_amount,
        ignored=kept,
        layer_types=list(cfg.layer_types),
        round_to=cfg.round_to,
    )


def _one_shot_accuracy(
    job: PruneJob, model: nn.Module, plan: channels.ChannelPlan, target: float | None
) -> dict:
    """Accuracy of cutting to the final size in one go, before any fine-tuning, measured on a copy
    so the report can show what the steps and fine-tuning bought back."""
    probe = copy.deepcopy(model).cpu()
    if target is not None:
        channels.prune_to_macs(probe, job.example, target, plan)
    else:
        channels.structured_prune(probe, job.example, job.cfg.amount, plan)
    just_pruned = accuracies(probe.to(job.ctx.device), job)
    del probe
    return just_pruned


def _epochs_per_step(ft: Any, steps: int) -> list[int]:
    """The fine-tuning epochs split over the steps, the remainder going to the last ones (all zero
    without fine-tuning)."""
    if ft is None:
        return [0] * steps
    return [ft.epochs // steps + (1 if k >= steps - ft.epochs % steps else 0) for k in range(steps)]


def _prune_in_steps(
    job: PruneJob, model: nn.Module, plan: channels.ChannelPlan, macs0: int, target: float | None
) -> tuple[nn.Module, list[dict], list[dict], dict | None]:
    """Run the steps not yet recorded in ``work/steps.json``, reloading the model of those that are.

    Returns the model after the last step, every step's record, the training history of the steps
    run now and the last BatchNorm adaptation's record.
    """
    cfg = job.cfg
    work = job.out_dir / "work"
    done_file = work / "steps.json"
    done: list[dict] = read_json(done_file) if done_file.is_file() else []
    epochs = _epochs_per_step(cfg.finetune, cfg.steps)
    history: list[dict] = []
    batchnorm = None  # the last BatchNorm adaptation's record
    previous = 0.0  # the cumulative ratio the previous step reached (``amount`` only)
    for k in range(1, cfg.steps + 1):
        step_dir = work / f"step{k}"
        if k <= len(done):  # finished by an earlier run: its saved model and record stand
            model, _ = load_model(step_dir / "model.pt")
        else:
            model = model.cpu()
            record = _run_step(job, model, plan, k, step_dir, macs0, target, previous, epochs[k - 1], history)
            done.append(record)
            write_json(done_file, done)
            job.ctx.log.info(
                "%s: step %d/%d: %d MACs, %d parameters",
                cfg.label,
                k,
                cfg.steps,
                record["macs"],
                record["parameters"],
            )
        previous = done[k - 1]["ratio"] or 0.0
        batchnorm = done[k - 1].get("batchnorm", batchnorm)
    return model, done, history, batchnorm


def _run_step(
    job: PruneJob,
    model: nn.Module,
    plan: channels.ChannelPlan,
    k: int,
    step_dir: Path,
    macs0: int,
    target: float | None,
    previous: float,
    epochs: int,
    history: list[dict],
) -> dict:
    """Step ``k``: cut ``model`` in place to its share of the MACs target (or of ``amount``),
    fine-tune it for ``epochs`` and save it in ``step_dir``; returns the step's record.

    With ``amount`` the ratio is cumulative, so each step cuts its share of what the previous
    step (``previous``) left. Appends the fine-tuning history to ``history``.
    """
    cfg, example, ft = job.cfg, job.example, job.cfg.finetune
    steps = cfg.steps
    if target is not None:
        goal = macs0 * (1 - (1 - 1 / cfg.target_macs_reduction) * k / steps)
        channels.prune_to_macs(model, example, goal, plan)
        cumulative = step_ratio = None
    else:
        cumulative = cfg.amount * k / steps
        step_ratio = 1 - (1 - cumulative) / (1 - previous)
        channels.structured_prune(model, example, step_ratio, plan)
    macs_k, params_k = measure.count_macs(model, example).macs, measure.count_parameters(model)
    record = {
        "step": k,
        "ratio": cumulative,
        "step_ratio": step_ratio,
        "macs_reduction": round(macs0 / max(1, macs_k), 4),
        "macs": macs_k,
        "parameters": params_k,
    }
    if ft is not None and epochs:
        step_cfg = ft.model_copy(update={"epochs": epochs})
        result = job.finetune(model, step_cfg, step_dir, f"{cfg.label} step {k}")
        history += result.history
        record["batchnorm"] = result.batchnorm
        record["val_accuracy"] = result.val_accuracy
    save_model(model.cpu(), job.spec, step_dir / "model.pt")
    return record


def _structured_result(
    job: PruneJob,
    model: nn.Module,
    *,
    macs0: int,
    params0: int,
    before: dict,
    just_pruned: dict,
    done: list[dict],
    history: list[dict],
    batchnorm: dict | None,
) -> StageResult:
    """Save the pruned model and measure the reloaded file, so the metrics describe what ships;
    build the variant (with its layer shapes and step records) and the stage's metrics."""
    cfg, ctx, out_dir, example = job.cfg, job.ctx, job.out_dir, job.example
    model = model.cpu()
    save_model(model, job.spec, out_dir / "model.pt")
    model, _ = load_model(out_dir / "model.pt")
    macs1, params1 = measure.count_macs(model, example).macs, measure.count_parameters(model)
    after = accuracies(model.to(ctx.device), job)
    shapes = {
        n: list(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }
    metrics = {
        **after,
        "parameters": params1,
        "nonzero_parameters": measure.count_nonzero_parameters(model),
        "parameters_before": params0,
        "macs": macs1,
        "macs_before": macs0,
        "macs_reduction": macs0 / max(1, macs1),
        "parameter_reduction": params0 / max(1, params1),
        "input_test_accuracy": before["test_accuracy"],
        "test_accuracy_before_finetune": just_pruned["test_accuracy"],
        "val_accuracy_before_finetune": just_pruned["val_accuracy"],
        "steps": cfg.steps,
    }
    ctx.log.info(
        "%s: MACs %d -> %d (%.2fx), parameters %d -> %d, test %.4f (input %.4f)",
        cfg.label,
        macs0,
        macs1,
        macs0 / max(1, macs1),
        params0,
        params1,
        after["test_accuracy"],
        before["test_accuracy"],
    )
    variant = job.variant(
        "structured",
        metrics,
        {
            "importance": cfg.importance,
            "scope": cfg.channel_scope,
            "layer_shapes": shapes,
            "steps": done,
        },
    )
    return StageResult(
        variants=[variant], metrics={**metrics, "history": history, "steps": done, "batchnorm": batchnorm}
    )


def unreachable(cfg: PruneSpec, spec: dict, limit: float) -> str:
    """The message for a MACs target beyond what the architecture allows (weights play no part)."""
    return (
        f"{cfg.target_macs_reduction}x is unreachable for {model_name(spec)}: at most {limit:.2f}x with "
        f"max_layer_amount={cfg.max_layer_amount} (the classifier and excluded layers stay whole); "
        "lower the target or raise max_layer_amount"
    )
