"""The magnitude (unstructured) pruning job: global L1 masks, gradual or one-shot, then fine-tuning.

Saves plain weights holding real zeros, so the model file, ONNX export and int8 stages see an
ordinary model; the per-layer sparsity travels beside it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress import measure
from compress.fileio import write_json
from compress.measure import evaluate
from compress.models import load_model, save_model
from compress.pruning import masks, sensitivity
from compress.pruning.job import PruneJob, PruneProblem, accuracies, adapt_unfinetuned
from compress.training_defaults import DEFAULT_BATCH
from compress.variants import StageResult


def run_magnitude(job: PruneJob) -> StageResult:
    """Zero the smallest weights of the chosen layers, one-shot or gradually over a fine-tuning run.

    Records the accuracy of one-shot pruning before any fine-tuning too, so the report can show
    what the fine-tuning bought back.
    """
    cfg, model = job.cfg, job.model
    layers = masks.prunable_layers(model, cfg.layer_types, job.kept)
    if not layers:
        raise PruneProblem("layer_types", "no layer left to prune after exclude/exclude_classifier")
    limits, total = _sparsity_limits(job, layers)
    initial, _ = masks.layer_sparsity(layers)
    if initial >= cfg.amount:
        raise PruneProblem("amount", f"the input {job.source.name!r} is already {initial:.4f} sparse")
    macs, params = measure.count_macs(model, job.example).macs, measure.count_parameters(model)
    before = accuracies(model, job)
    drops = _layer_sensitivity(job, layers, before)
    just_pruned = _one_shot_accuracy(job, limits, before)

    events: list[dict] = []
    history: list[dict] = []
    if cfg.finetune is None:
        masks.magnitude_masks(layers, cfg.amount, limits)
        batchnorm = adapt_unfinetuned(model, job)
    else:
        batchnorm = _prune_while_finetuning(job, layers, limits, initial, events, history)
        if cfg.final_finetune:
            batchnorm = _final_finetune_keeping_zeros(job, layers, history)

    return _magnitude_result(
        job,
        layers,
        total=total,
        macs=macs,
        params=params,
        before=before,
        just_pruned=just_pruned,
        drops=drops,
        events=len(events),
        history=history,
        batchnorm=batchnorm,
    )


def _sparsity_limits(job: PruneJob, layers: dict[str, nn.Module]) -> tuple[dict[str, float], int]:
    """Each layer's sparsity cap (``max_layer_sparsity``, then ``layer_sparsity_limits``) and the
    prunable weight count; refuses an ``amount`` the caps leave out of reach before any work."""
    cfg = job.cfg
    limits = {n: cfg.max_layer_sparsity for n in layers} if cfg.max_layer_sparsity else {}
    limits.update(cfg.layer_sparsity_limits)
    total = sum(m.weight.numel() for m in layers.values())
    capacity = sum(limits.get(n, 1.0) * m.weight.numel() for n, m in layers.items())
    if cfg.amount * total > capacity + 1:
        raise PruneProblem(
            "amount",
            f"{cfg.amount} is unreachable with the per-layer limits (at most {capacity / total:.4f})",
        )
    return limits, total


def _layer_sensitivity(job: PruneJob, layers: dict[str, nn.Module], before: dict) -> list[dict] | None:
    """The validation drop of pruning each layer alone to ``amount`` (``sensitivity: true``).

    Only a chart for the report, so a tuning trial, which nothing would show, skips it.
    """
    cfg, bundle, ctx = job.cfg, job.bundle, job.ctx
    if not cfg.sensitivity or ctx.tuning:
        return None
    if before["val_accuracy"] is None:
        raise PruneProblem("sensitivity", "needs a validation split (data.val_size > 0) to score layers")
    return sensitivity.layer_sensitivity(
        job.model,
        list(layers),
        cfg.amount,
        lambda probe: evaluate(probe.to(ctx.device), bundle, bundle.val, ctx.device)["accuracy"],
        before["val_accuracy"],
    )


def _one_shot_accuracy(job: PruneJob, limits: dict[str, float], before: dict) -> dict:
    """Accuracy of one-shot pruning to the final sparsity, before any fine-tuning, measured on a
    copy so the model itself is pruned by the chosen schedule."""
    cfg, ctx = job.cfg, job.ctx
    probe = copy.deepcopy(job.model)
    probe_layers = masks.prunable_layers(probe, cfg.layer_types, job.kept)
    masks.magnitude_masks(probe_layers, cfg.amount, limits)
    just_pruned = accuracies(probe.to(ctx.device), job)
    del probe
    ctx.log.info(
        "%s: one-shot to %.3f sparsity without fine-tuning: test %.4f (input %.4f)",
        cfg.label,
        cfg.amount,
        just_pruned["test_accuracy"],
        before["test_accuracy"],
    )
    return just_pruned


def _prune_while_finetuning(
    job: PruneJob,
    layers: dict[str, nn.Module],
    limits: dict[str, float],
    initial: float,
    events: list[dict],
    history: list[dict],
) -> dict | None:
    """Raise the sparsity from ``initial`` to ``amount`` in ``steps`` mask events spread over the
    fine-tuning run, so the network recovers between cuts; returns the BatchNorm record.

    A killed run resumes from the fine-tuning checkpoint with the masks it had reached. Appends
    the mask events and training history to ``events`` and ``history``.
    """
    cfg, out_dir = job.cfg, job.out_dir
    ft = cfg.finetune
    steps_per_epoch = -(-len(job.bundle.train) // (ft.batch_size or DEFAULT_BATCH))
    sparsities, iters = masks.event_schedule(
        initial, cfg.amount, cfg.steps, ft.epochs * steps_per_epoch, cfg.ramp
    )
    hook = masks.GradualPruner(
        layers,
        sparsities,
        iters,
        limits,
        on_event=lambda k, s: events.append({"event": k, "sparsity": s}),
    )
    hook.start()
    workdir = out_dir / "work" / "finetune"
    if (workdir / "checkpoint.pt").exists():
        state = torch.load(workdir / "checkpoint.pt", map_location="cpu", weights_only=True)
        hook.resume(state["model"], int(state["epoch"]) * steps_per_epoch)
    write_json(out_dir / "work" / "schedule.json", {"sparsity": sparsities, "after_step": iters})
    result = job.finetune(job.model, ft, workdir, f"{cfg.label} prune", after_step=hook)
    history += result.history
    masks.apply_masks(layers, hook.masks)
    return result.batchnorm


def _final_finetune_keeping_zeros(
    job: PruneJob, layers: dict[str, nn.Module], history: list[dict]
) -> dict | None:
    """``final_finetune`` more epochs at the reached sparsity: the zeros are re-applied after every
    step so training cannot revive pruned weights. Appends to ``history``; returns the BatchNorm
    record."""
    cfg = job.cfg
    final = cfg.finetune.model_copy(update={"epochs": cfg.final_finetune})
    zeros_kept = {n: m.weight.detach() != 0 for n, m in layers.items()}
    result = job.finetune(
        job.model,
        final,
        job.out_dir / "work" / "final",
        f"{cfg.label} final",
        after_step=lambda: masks.apply_masks(layers, zeros_kept),
    )
    history += result.history
    masks.apply_masks(layers, zeros_kept)
    return result.batchnorm


def _magnitude_result(
    job: PruneJob,
    layers: dict[str, nn.Module],
    *,
    total: int,
    macs: int,
    params: int,
    before: dict,
    just_pruned: dict,
    drops: list[dict] | None,
    events: int,
    history: list[dict],
    batchnorm: dict | None,
) -> StageResult:
    """The variant and the stage's metrics for the saved model, with the one-shot and input
    accuracies beside it so the report shows what fine-tuning bought back."""
    cfg, ctx = job.cfg, job.ctx
    model, after, sparsity, per_layer = _save_and_score(job, layers)
    nonzero = measure.count_nonzero_parameters(model)
    for row in drops or []:
        row["shipped_sparsity"] = per_layer.get(row["layer"])
    metrics = {
        **after,
        "parameters": measure.count_parameters(model),
        "nonzero_parameters": nonzero,
        "sparsity": sparsity,
        "prunable_weights": total,
        "compression_ratio": total / max(1, total - round(sparsity * total)),
        "macs": macs,
        "input_test_accuracy": before["test_accuracy"],
        "test_accuracy_before_finetune": just_pruned["test_accuracy"],
        "val_accuracy_before_finetune": just_pruned["val_accuracy"],
        "steps": cfg.steps,
    }
    ctx.log.info(
        "%s: sparsity %.4f (%d of %d parameters non-zero), test %.4f (input %.4f)",
        cfg.label,
        sparsity,
        nonzero,
        params,
        after["test_accuracy"],
        before["test_accuracy"],
    )
    sensitivity_info = {"layer_sensitivity": drops} if drops else {}
    variant = job.variant(
        "magnitude",
        metrics,
        {
            "per_layer_sparsity": per_layer,
            "schedule": cfg.schedule,
            "events": events,
            **sensitivity_info,
        },
    )
    return StageResult(
        variants=[variant],
        metrics={
            **metrics,
            "per_layer_sparsity": per_layer,
            "history": history,
            "batchnorm": batchnorm,
            **sensitivity_info,
        },
        publish={"per_layer_sparsity.json": f"{cfg.output_name}.per_layer_sparsity.json"},
    )


def _save_and_score(job: PruneJob, layers: dict[str, nn.Module]) -> tuple[nn.Module, dict, float, dict]:
    """Save the pruned model and score the reloaded file, so the metrics describe what ships;
    write the per-layer sparsity beside it. Returns the reloaded model, its accuracies, and the
    overall and per-layer sparsity."""
    cfg, out_dir = job.cfg, job.out_dir
    model = job.model.cpu()
    sparsity, per_layer = masks.layer_sparsity(layers)
    save_model(model, job.spec, out_dir / "model.pt")
    model, _ = load_model(out_dir / "model.pt")  # measure what was saved
    after = accuracies(model.to(job.ctx.device), job)
    write_json(
        out_dir / "per_layer_sparsity.json",
        {"variant": cfg.output_name, "overall": sparsity, "layers": per_layer},
    )
    return model, after, sparsity, per_layer
