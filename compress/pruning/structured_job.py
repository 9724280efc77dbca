"""The structured (channel) pruning job: torch-pruning removes whole channels, then fine-tuning.

The model is physically smaller (fewer MACs and parameters), and reloads from its spec and
state dict with the new channel counts.
"""

from __future__ import annotations

import copy

import torch

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
    cfg, model, spec, ctx, out_dir = job.cfg, job.model, job.spec, job.ctx, job.out_dir
    kept, example = job.kept, job.example
    plan = channels.ChannelPlan(
        importance=cfg.importance,
        scope=cfg.channel_scope,
        max_layer_amount=cfg.max_layer_amount,
        ignored=kept,
        layer_types=list(cfg.layer_types),
        round_to=cfg.round_to,
    )
    model = model.cpu()
    macs0, params0 = measure.count_macs(model, example).macs, measure.count_parameters(model)
    steps = cfg.steps
    target = macs0 / cfg.target_macs_reduction if cfg.target_macs_reduction else None
    if target is not None:
        limit = channels.max_macs_reduction(model, example, plan)
        if limit < cfg.target_macs_reduction:
            raise PruneProblem("target_macs_reduction", unreachable(cfg, spec, limit))
    before = accuracies(model.to(ctx.device), job)
    probe = copy.deepcopy(model).cpu()
    if target is not None:
        channels.prune_to_macs(probe, example, target, plan)
    else:
        channels.structured_prune(probe, example, cfg.amount, plan)
    just_pruned = accuracies(probe.to(ctx.device), job)
    del probe

    work = out_dir / "work"
    done_file = work / "steps.json"
    done: list[dict] = read_json(done_file) if done_file.is_file() else []
    ft = cfg.finetune
    per_step = [0] * steps
    if ft is not None:
        per_step = [ft.epochs // steps + (1 if k >= steps - ft.epochs % steps else 0) for k in range(steps)]
    history: list[dict] = []
    batchnorm = None  # the last BatchNorm adaptation's record
    previous = 0.0
    for k in range(1, steps + 1):
        step_dir = work / f"step{k}"
        if k <= len(done):
            model, _ = load_model(step_dir / "model.pt")
            previous = done[k - 1]["ratio"] or 0.0
            batchnorm = done[k - 1].get("batchnorm", batchnorm)
            continue
        model = model.cpu()
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
        if ft is not None and per_step[k - 1]:
            step_cfg = ft.model_copy(update={"epochs": per_step[k - 1]})
            result = job.finetune(model, step_cfg, step_dir, f"{cfg.label} step {k}")
            history += result.history
            batchnorm = record["batchnorm"] = result.batchnorm
            record["val_accuracy"] = result.val_accuracy
        save_model(model.cpu(), spec, step_dir / "model.pt")
        done.append(record)
        write_json(done_file, done)
        previous = record["ratio"] or 0.0
        ctx.log.info("%s: step %d/%d: %d MACs, %d parameters", cfg.label, k, steps, macs_k, params_k)
    if cfg.final_finetune and ft is not None:
        final = ft.model_copy(update={"epochs": cfg.final_finetune})
        result = job.finetune(model, final, work / "final", f"{cfg.label} final")
        history += result.history
        batchnorm = result.batchnorm
    if ft is None:  # removed channels shift every later layer's inputs; nothing re-estimated them
        batchnorm = adapt_unfinetuned(model, job)

    model = model.cpu()
    save_model(model, spec, out_dir / "model.pt")
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
        "steps": steps,
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
