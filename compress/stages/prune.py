"""Stage ``prune``: global magnitude (unstructured) or channel (structured) pruning.

``magnitude`` zeroes the smallest weights across the chosen layers, one-shot or gradually
(Zhu & Gupta's cubic schedule, pruning events spread over a fine-tuning run), and saves
plain weights holding real zeros. ``structured`` removes whole channels and neurons with
torch-pruning's dependency graph, so the model is physically smaller; optional steps alternate
pruning and fine-tuning. The mechanics live in ``compress.pruning``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from compress import measure, pruning
from compress.config import OptimizerConfig, SoftLabels, StageConfig, TrainingConfig
from compress.context import Context
from compress.errors import ConfigError
from compress.fileio import read_json, write_json
from compress.measure import count_parameters
from compress.models import inspect, load_model, save_model
from compress.stages import stage
from compress.training import Distillation, evaluate, fit, teacher_logits
from compress.variants import StageResult, Variant

MAGNITUDE_ONLY = ("exclude_classifier", "max_layer_sparsity", "layer_sparsity_limits", "ramp")
STRUCTURED_ONLY = ("target_macs_reduction", "importance", "scope", "max_layer_amount", "round_to")
DEFAULT_AMOUNT = {"magnitude": 0.92, "structured": None}


def _default_finetune() -> TrainingConfig:
    return TrainingConfig(
        epochs=8,
        optimizer=OptimizerConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=5e-5),
        schedule="cosine",
    )


class PruneConfig(StageConfig):
    stage: Literal["prune"]
    tunable: ClassVar[bool] = True
    method: Literal["magnitude", "structured"] = "magnitude"
    output: str | None = None
    amount: float | None = Field(None, gt=0, lt=1)
    target_macs_reduction: float | None = Field(None, gt=1, le=1000)
    schedule: Literal["oneshot", "cubic"] = "cubic"
    steps: int | None = Field(None, ge=1, le=10_000)
    ramp: float = Field(0.6, gt=0, le=1)
    layer_types: list[Literal["Linear", "Conv2d"]] = Field(
        default_factory=lambda: ["Linear", "Conv2d"], min_length=1
    )
    exclude: list[str] = Field(default_factory=list)
    exclude_classifier: bool = False
    max_layer_sparsity: float | None = Field(None, gt=0, le=1)
    layer_sparsity_limits: dict[str, float] = Field(default_factory=dict)
    importance: Literal["l1", "l2", "group_norm"] = "group_norm"
    scope: Literal["global", "uniform"] = "global"
    max_layer_amount: float = Field(0.9, gt=0, lt=1)
    round_to: int | None = Field(None, ge=1, le=1024)
    finetune: TrainingConfig | None = Field(default_factory=_default_finetune)
    final_finetune: int = Field(0, ge=0, le=10_000)
    # fine-tune against the unpruned input's soft labels as well as the hard labels
    distill: SoftLabels | None = None

    @model_validator(mode="after")
    def _defaults(self) -> PruneConfig:
        if self.amount is None and self.target_macs_reduction is None:
            if self.method == "magnitude":
                self.amount = DEFAULT_AMOUNT["magnitude"]
            else:
                self.target_macs_reduction = 2.0
        if self.steps is None:
            self.steps = 12 if self.method == "magnitude" and self.schedule == "cubic" else 1
        return self

    @property
    def output_name(self) -> str:
        return self.output or ("pruned" if self.method == "magnitude" else "slim")

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for every setting that cannot work, without needing the model."""
        found: list[tuple[str, str]] = []
        given = self.model_fields_set
        wrong = STRUCTURED_ONLY if self.method == "magnitude" else MAGNITUDE_ONLY
        for key in wrong:
            if key in given:
                found.append(
                    (key, f"only applies to method {'structured' if key in STRUCTURED_ONLY else 'magnitude'}")
                )
        if self.method == "structured" and "amount" in given and "target_macs_reduction" in given:
            found.append(("target_macs_reduction", "give either amount or target_macs_reduction, not both"))
        if self.schedule == "oneshot" and self.steps != 1:
            found.append(
                ("steps", f"schedule oneshot prunes in one step; got steps={self.steps} (use cubic)")
            )
        if self.method == "structured" and self.schedule == "cubic" and "schedule" in given:
            found.append(("schedule", "the cubic schedule is for magnitude; structured uses steps"))
        if self.method == "structured" and self.finetune is not None and self.finetune.epochs < self.steps:
            found.append(("finetune.epochs", f"must be >= steps ({self.steps}): each step fine-tunes"))
        for name, limit in self.layer_sparsity_limits.items():
            if not 0 < limit <= 1:
                found.append((f"layer_sparsity_limits.{name}", f"must be in (0, 1]; got {limit}"))
        if self.method == "magnitude" and self.finetune is None and self.steps > 1:
            found.append(("steps", "gradual pruning needs finetune: epochs to spread its steps over"))
        if self.final_finetune and self.finetune is None:
            found.append(("final_finetune", "needs a finetune: section for its optimizer settings"))
        if self.distill is not None and self.finetune is None:
            found.append(("distill", "distils during fine-tuning; it needs a finetune: section"))
        return found

    def check(self, pipeline) -> None:
        for key, message in self.problems():
            raise ValueError(f"{key}: {message}")

    def consumes(self, available: list[str]) -> list[str]:
        names = list(self.from_) if self.from_ is not None else ["baseline"]
        if len(names) != 1:
            raise ValueError(f"from: the prune stage takes exactly one variant; got {len(names)}")
        return names

    def produces(self, inputs: list[str]) -> list[str]:
        return [self.output_name]


def _fail(ctx: Context, cfg: PruneConfig, key: str, message: str) -> ConfigError:
    index = next((i for i, s in enumerate(ctx.pipeline.stages) if s.label == cfg.label), None)
    where = f"stages[{index}] ({cfg.label})" if index is not None else f"({cfg.label})"
    return ConfigError(f"{ctx.pipeline.path}: {where}.{key}: {message}")


@stage("prune", PruneConfig, version=1, distributed=True)
def run(cfg: PruneConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    for key, message in cfg.problems():
        raise _fail(ctx, cfg, key, message)
    source = inputs[0]
    model, spec = source.load_torch()
    bundle = ctx.data()
    names = {n for n, _ in model.named_modules() if n}
    for key, listed in (("exclude", cfg.exclude), ("layer_sparsity_limits", list(cfg.layer_sparsity_limits))):
        for name in listed:
            if name not in names:
                raise _fail(
                    ctx,
                    cfg,
                    f"{key}",
                    f"no layer named {name!r} in {_model_name(spec)}; layers: "
                    + _listed(
                        n
                        for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
                    ),
                )
    present = {type(m).__name__ for m in model.modules()}
    for kind in cfg.layer_types if "layer_types" in cfg.model_fields_set else ():
        if kind not in present:
            raise _fail(
                ctx,
                cfg,
                "layer_types",
                f"{_model_name(spec)} has no {kind} layers; it has "
                + ", ".join(sorted(present & set(pruning.LAYER_TYPES))),
            )
    example = bundle.normalize(bundle.train.x[:1]).cpu()
    classifier = inspect(model, example, bundle.num_classes).classifier
    if classifier is None:
        ctx.log.warning(
            "%s: found no classifier layer (one output per class); no layer is kept whole", cfg.label
        )
    started, cpu_started = time.perf_counter(), time.process_time()
    teacher = _teacher(cfg, model, bundle, ctx)
    if cfg.method == "magnitude":
        kept = [*cfg.exclude, *([classifier] if cfg.exclude_classifier and classifier else [])]
        result = _magnitude(cfg, model, spec, bundle, ctx, out_dir, source, teacher, kept)
    else:
        kept = [*([classifier] if classifier else []), *cfg.exclude]
        try:
            result = _structured(cfg, model, spec, bundle, ctx, out_dir, source, example, teacher, kept)
        except pruning.UntraceableModel as exc:
            raise _fail(ctx, cfg, "method", f"structured pruning of {_model_name(spec)}: {exc}") from None
    variant = result.variants[0]
    variant.info["distill"] = cfg.distill.model_dump() if cfg.distill else None
    variant.metrics["prune_seconds"] = round(time.perf_counter() - started, 2)
    variant.metrics["prune_cpu_seconds"] = round(time.process_time() - cpu_started, 2)
    for key in ("prune_seconds", "prune_cpu_seconds"):
        result.metrics[key] = variant.metrics[key]
    return result


def _model_name(spec: dict) -> str:
    return str(spec.get("torchvision") or spec.get("timm") or spec.get("import_path") or spec.get("arch"))


def _listed(names, limit: int = 20) -> str:  # noqa: ANN001 - any iterable of names
    names = list(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _teacher(cfg: PruneConfig, model: torch.nn.Module, bundle, ctx: Context) -> Distillation | None:
    """The unpruned input as the fine-tuning's teacher (``distill:``), or None without one.

    A frozen copy taken before any weight is removed; its logits are computed once when the
    fine-tuning does not augment (the teacher would see the same images every epoch).
    """
    if cfg.distill is None or cfg.finetune is None:
        return None
    teacher = copy.deepcopy(model)
    logits = teacher_logits(teacher, bundle, ctx.device) if cfg.finetune.augment == "none" else None
    return Distillation(teacher, cfg.distill.temperature, cfg.distill.alpha, logits)


def _measure(model, bundle, ctx) -> dict:
    # a tuning trial (ctx.tuning) is scored on validation data only: no test split there
    test = None if ctx.tuning else evaluate(model, bundle, bundle.test, ctx.device)
    val = evaluate(model, bundle, bundle.val, ctx.device) if len(bundle.val) else None
    return {
        "test_accuracy": test["accuracy"] if test else None,
        "val_accuracy": val["accuracy"] if val else None,
    }


# ------------------------------------------------------------------ magnitude


def _magnitude(cfg, model, spec, bundle, ctx, out_dir, source, teacher, kept) -> StageResult:
    layers = pruning.prunable_layers(model, cfg.layer_types, kept)
    if not layers:
        raise _fail(ctx, cfg, "layer_types", "no layer left to prune after exclude/exclude_classifier")
    limits = {n: cfg.max_layer_sparsity for n in layers} if cfg.max_layer_sparsity else {}
    limits.update(cfg.layer_sparsity_limits)
    total = sum(m.weight.numel() for m in layers.values())
    capacity = sum(limits.get(n, 1.0) * m.weight.numel() for n, m in layers.items())
    if cfg.amount * total > capacity + 1:
        raise _fail(
            ctx,
            cfg,
            "amount",
            f"{cfg.amount} is unreachable with the per-layer limits (at most {capacity / total:.4f})",
        )
    initial, _ = pruning.layer_sparsity(layers)
    if initial >= cfg.amount:
        raise _fail(ctx, cfg, "amount", f"the input {source.name!r} is already {initial:.4f} sparse")
    example = bundle.normalize(bundle.train.x[:1]).cpu()
    macs, params = measure.count_macs(model, example).macs, measure.count_parameters(model)
    before = _measure(model, bundle, ctx)

    # accuracy of one-shot pruning to the final sparsity, before any fine-tuning
    probe = copy.deepcopy(model)
    probe_layers = pruning.prunable_layers(probe, cfg.layer_types, kept)
    pruning.magnitude_masks(probe_layers, cfg.amount, limits)
    just_pruned = _measure(probe.to(ctx.device), bundle, ctx)
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
        pruning.magnitude_masks(layers, cfg.amount, limits)
    else:
        ft = cfg.finetune
        steps_per_epoch = -(-len(bundle.train) // (ft.batch_size or 128))
        sparsities, iters = pruning.event_schedule(
            initial, cfg.amount, cfg.steps, ft.epochs * steps_per_epoch, cfg.ramp
        )
        hook = pruning.GradualPruner(
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
        result = fit(
            model,
            bundle,
            ft,
            ctx.device,
            ctx.seed,
            workdir,
            desc=f"{cfg.label} prune",
            after_step=hook,
            distill=teacher,
            on_epoch=ctx.on_epoch,
        )
        history += result.history
        pruning.apply_masks(layers, hook.masks)
        if cfg.final_finetune:
            final = ft.model_copy(update={"epochs": cfg.final_finetune})
            masks = {n: m.weight.detach() != 0 for n, m in layers.items()}
            result = fit(
                model,
                bundle,
                final,
                ctx.device,
                ctx.seed,
                out_dir / "work" / "final",
                desc=f"{cfg.label} final",
                after_step=lambda: pruning.apply_masks(layers, masks),
                distill=teacher,
                on_epoch=ctx.on_epoch,
            )
            history += result.history
            pruning.apply_masks(layers, masks)

    model = model.cpu()
    sparsity, per_layer = pruning.layer_sparsity(layers)
    save_model(model, spec, out_dir / "model.pt")
    model, _ = load_model(out_dir / "model.pt")  # measure what was saved
    after = _measure(model.to(ctx.device), bundle, ctx)
    write_json(
        out_dir / "per_layer_sparsity.json",
        {"variant": cfg.output_name, "overall": sparsity, "layers": per_layer},
    )
    nonzero = measure.count_nonzero_parameters(model)
    metrics = {
        **after,
        "parameters": count_parameters(model),
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
    variant = Variant(
        name=cfg.output_name,
        format="torch",
        file=out_dir / "model.pt",
        stage=cfg.label,
        parent=source.name,
        metrics=metrics,
        info={
            "method": "magnitude",
            "spec": spec,
            "per_layer_sparsity": per_layer,
            "schedule": cfg.schedule,
            "events": len(events),
        },
    )
    return StageResult(
        variants=[variant],
        metrics={**metrics, "per_layer_sparsity": per_layer, "history": history},
        publish={"per_layer_sparsity.json": f"{cfg.output_name}.per_layer_sparsity.json"},
    )


# ------------------------------------------------------------------ structured


def _structured(cfg, model, spec, bundle, ctx, out_dir, source, example, teacher, kept) -> StageResult:
    plan = pruning.ChannelPlan(
        importance=cfg.importance,
        scope=cfg.scope,
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
        ratio, reached = pruning.ratio_for_macs(model, example, target, plan)
        if reached > target:
            raise _fail(
                ctx,
                cfg,
                "target_macs_reduction",
                f"{cfg.target_macs_reduction}x is unreachable for {_model_name(spec)}: at most "
                f"{macs0 / reached:.2f}x with max_layer_amount={cfg.max_layer_amount} "
                "(the classifier and excluded layers stay whole)",
            )
    else:
        ratio = cfg.amount
    before = _measure(model.to(ctx.device), bundle, ctx)
    probe = copy.deepcopy(model).cpu()
    pruning.structured_prune(probe, example, ratio, plan)
    just_pruned = _measure(probe.to(ctx.device), bundle, ctx)
    del probe

    work = out_dir / "work"
    done_file = work / "steps.json"
    done: list[dict] = read_json(done_file) if done_file.is_file() else []
    ft = cfg.finetune
    per_step = [0] * steps
    if ft is not None:
        per_step = [ft.epochs // steps + (1 if k >= steps - ft.epochs % steps else 0) for k in range(steps)]
    history: list[dict] = []
    previous = 0.0
    for k in range(1, steps + 1):
        step_dir = work / f"step{k}"
        if k <= len(done):
            model, _ = load_model(step_dir / "model.pt")
            previous = done[k - 1]["ratio"]
            continue
        model = model.cpu()
        if target is not None and steps == 1:
            step_ratio, cumulative = ratio, None
        elif target is not None:
            goal = macs0 * (1 - (1 - 1 / cfg.target_macs_reduction) * k / steps)
            step_ratio, _ = pruning.ratio_for_macs(model, example, goal, plan)
            cumulative = None
        else:
            cumulative = cfg.amount * k / steps
            step_ratio = 1 - (1 - cumulative) / (1 - previous)
        pruning.structured_prune(model, example, step_ratio, plan)
        macs_k, params_k = measure.count_macs(model, example).macs, measure.count_parameters(model)
        record = {
            "step": k,
            "ratio": cumulative if cumulative is not None else step_ratio,
            "step_ratio": step_ratio,
            "macs": macs_k,
            "parameters": params_k,
        }
        if ft is not None and per_step[k - 1]:
            step_cfg = ft.model_copy(update={"epochs": per_step[k - 1]})
            result = fit(
                model,
                bundle,
                step_cfg,
                ctx.device,
                ctx.seed,
                step_dir,
                desc=f"{cfg.label} step {k}",
                distill=teacher,
                on_epoch=ctx.on_epoch,
            )
            history += result.history
            record["val_accuracy"] = result.history[-1]["val_accuracy"] if result.history else None
        save_model(model.cpu(), spec, step_dir / "model.pt")
        done.append(record)
        write_json(done_file, done)
        previous = record["ratio"]
        ctx.log.info("%s: step %d/%d: %d MACs, %d parameters", cfg.label, k, steps, macs_k, params_k)
    if cfg.final_finetune and ft is not None:
        final = ft.model_copy(update={"epochs": cfg.final_finetune})
        result = fit(
            model,
            bundle,
            final,
            ctx.device,
            ctx.seed,
            work / "final",
            desc=f"{cfg.label} final",
            distill=teacher,
            on_epoch=ctx.on_epoch,
        )
        history += result.history

    model = model.cpu()
    save_model(model, spec, out_dir / "model.pt")
    model, _ = load_model(out_dir / "model.pt")
    macs1, params1 = measure.count_macs(model, example).macs, measure.count_parameters(model)
    after = _measure(model.to(ctx.device), bundle, ctx)
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
    variant = Variant(
        name=cfg.output_name,
        format="torch",
        file=out_dir / "model.pt",
        stage=cfg.label,
        parent=source.name,
        metrics=metrics,
        info={
            "method": "structured",
            "spec": spec,
            "importance": cfg.importance,
            "scope": cfg.scope,
            "layer_shapes": shapes,
            "steps": done,
        },
    )
    return StageResult(variants=[variant], metrics={**metrics, "history": history, "steps": done})
