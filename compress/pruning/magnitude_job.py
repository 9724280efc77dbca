"""The magnitude (unstructured) pruning job: global L1 masks, gradual or one-shot, then fine-tuning.

Saves plain weights holding real zeros, so the model file, ONNX export and int8 stages see an
ordinary model; the per-layer sparsity travels beside it.
"""

from __future__ import annotations

import copy

import torch

from compress import measure
from compress.fileio import write_json
from compress.models import load_model, save_model
from compress.pruning import masks, sensitivity
from compress.pruning.job import PruneJob, PruneProblem, accuracies, adapt_unfinetuned
from compress.training import evaluate
from compress.training_defaults import DEFAULT_BATCH
from compress.variants import StageResult


def run_magnitude(job: PruneJob) -> StageResult:
    """Zero the smallest weights of the chosen layers, one-shot or gradually over a fine-tuning run.

    Records the accuracy of one-shot pruning before any fine-tuning too, so the report can show
    what the fine-tuning bought back.
    """
    cfg, model, spec, bundle, ctx, out_dir = job.cfg, job.model, job.spec, job.bundle, job.ctx, job.out_dir
    source, kept, example = job.source, job.kept, job.example
    layers = masks.prunable_layers(model, cfg.layer_types, kept)
    if not layers:
        raise PruneProblem("layer_types", "no layer left to prune after exclude/exclude_classifier")
    limits = {n: cfg.max_layer_sparsity for n in layers} if cfg.max_layer_sparsity else {}
    limits.update(cfg.layer_sparsity_limits)
    total = sum(m.weight.numel() for m in layers.values())
    capacity = sum(limits.get(n, 1.0) * m.weight.numel() for n, m in layers.items())
    if cfg.amount * total > capacity + 1:
        raise PruneProblem(
            "amount",
            f"{cfg.amount} is unreachable with the per-layer limits (at most {capacity / total:.4f})",
        )
    initial, _ = masks.layer_sparsity(layers)
    if initial >= cfg.amount:
        raise PruneProblem("amount", f"the input {source.name!r} is already {initial:.4f} sparse")
    macs, params = measure.count_macs(model, example).macs, measure.count_parameters(model)
    before = accuracies(model, job)
    drops = None
    if cfg.sensitivity and not ctx.tuning:  # a chart for the report: no trial is scored by it
        if before["val_accuracy"] is None:
            raise PruneProblem("sensitivity", "needs a validation split (data.val_size > 0) to score layers")
        drops = sensitivity.layer_sensitivity(
            model,
            list(layers),
            cfg.amount,
            lambda probe: evaluate(probe.to(ctx.device), bundle, bundle.val, ctx.device)["accuracy"],
            before["val_accuracy"],
        )

    # accuracy of one-shot pruning to the final sparsity, before any fine-tuning
    probe = copy.deepcopy(model)
    probe_layers = masks.prunable_layers(probe, cfg.layer_types, kept)
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

    events: list[dict] = []
    history: list[dict] = []
    if cfg.finetune is None:
        masks.magnitude_masks(layers, cfg.amount, limits)
        batchnorm = adapt_unfinetuned(model, job)
    else:
        ft = cfg.finetune
        steps_per_epoch = -(-len(bundle.train) // (ft.batch_size or DEFAULT_BATCH))
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
        result = job.finetune(model, ft, workdir, f"{cfg.label} prune", after_step=hook)
        history += result.history
        batchnorm = result.batchnorm
        masks.apply_masks(layers, hook.masks)
        if cfg.final_finetune:
            final = ft.model_copy(update={"epochs": cfg.final_finetune})
            zeros_kept = {n: m.weight.detach() != 0 for n, m in layers.items()}
            result = job.finetune(
                model,
                final,
                out_dir / "work" / "final",
                f"{cfg.label} final",
                after_step=lambda: masks.apply_masks(layers, zeros_kept),
            )
            history += result.history
            batchnorm = result.batchnorm
            masks.apply_masks(layers, zeros_kept)

    model = model.cpu()
    sparsity, per_layer = masks.layer_sparsity(layers)
    save_model(model, spec, out_dir / "model.pt")
    model, _ = load_model(out_dir / "model.pt")  # measure what was saved
    after = accuracies(model.to(ctx.device), job)
    write_json(
        out_dir / "per_layer_sparsity.json",
        {"variant": cfg.output_name, "overall": sparsity, "layers": per_layer},
    )
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
    variant = job.variant(
        "magnitude",
        metrics,
        {
            "per_layer_sparsity": per_layer,
            "schedule": cfg.schedule,
            "events": len(events),
            **({"layer_sensitivity": drops} if drops else {}),
        },
    )
    return StageResult(
        variants=[variant],
        metrics={
            **metrics,
            "per_layer_sparsity": per_layer,
            "history": history,
            "batchnorm": batchnorm,
            **({"layer_sensitivity": drops} if drops else {}),
        },
        publish={"per_layer_sparsity.json": f"{cfg.output_name}.per_layer_sparsity.json"},
    )
