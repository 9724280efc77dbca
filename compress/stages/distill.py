"""Stage ``distill``: train a smaller student from a teacher variant, with a from-scratch control.

The student learns from ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``
(``training.kd_loss``); the teacher runs in eval mode under no_grad and is never updated
(its file and its in-memory weights are checksummed before and after). With ``control: true``
the same architecture is trained from the same initialisation, on hard labels only, with the
same budget, batches and seed, so the stage measures what distillation bought instead of
assuming it. With ``seeds: N`` both are trained N times and compared by mean and standard
deviation; a difference under two standard deviations is reported as "no measurable gain".
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.config import ModelConfig, StageConfig, TrainingConfig
from compress.context import Context
from compress.data import DataBundle, nominal_model_fields
from compress.distill_losses import FeatureDistillation
from compress.errors import ConfigError
from compress.fileio import sha256_file, write_json
from compress.gating import SCRATCH_SUFFIX
from compress.measure import count_macs, count_parameters
from compress.models import ModelSpec, build_model, save_model
from compress.models.builders import size_problem
from compress.stages import stage
from compress.training import Distillation, evaluate, fit, teacher_logits
from compress.variants import StageResult, Variant


class DistillConfig(StageConfig, TrainingConfig):
    """Train a smaller student from a teacher variant, with a from-scratch control."""

    stage: Literal["distill"] = Field(description="Trains a student from a teacher variant.")
    tunable: ClassVar[bool] = True
    student: ModelConfig = Field(
        ModelConfig(arch="lenet5", width=0.5), description="The student's architecture (keys as for model)."
    )
    temperature: float = Field(4.0, gt=0, le=1000, description="Softmax temperature T of the soft labels.")
    alpha: float = Field(
        0.9, ge=0, le=1, description="Weight of the soft (teacher) loss; 0: plain cross-entropy."
    )
    control: bool = Field(
        True, description="Also train <output>.scratch: the student from scratch on hard labels alone."
    )
    seeds: int = Field(
        1, ge=1, le=100, description="Train student and control this many times (3+ for a verdict)."
    )
    output: str = Field("student", description="The distilled variant's name.")
    loss: Literal["kd", "hint", "attention"] = Field(
        "kd",
        description="kd: logits only; hint (FitNets, penultimate feature) or attention (attention transfer, "
        "last convolution) add a feature loss.",
    )
    feature_weight: float = Field(
        1.0, gt=0, le=1e6, description="Weight of the hint or attention term next to the KD loss."
    )
    cache_teacher_logits: bool = Field(
        True, description="With augment: none and loss: kd, compute the teacher's logits once (faster)."
    )

    @model_validator(mode="after")
    def _attention_needs_feature_maps(self) -> DistillConfig:
        if self.loss == "attention" and self.student.arch in ("mlp", "lenet300"):
            raise ValueError(
                f"loss: attention transfer matches convolutional feature maps and student arch "
                f"{self.student.arch!r} has none; use loss: hint (the penultimate feature) or kd"
            )
        return self

    def check(self, pipeline: Any) -> None:
        """A student that cannot run on the data's images is refused before anything trains."""
        fields = nominal_model_fields(pipeline.data)
        problem = size_problem({**self.student.spec(), **fields}) if fields else None
        if problem:
            raise ValueError(f"student: {problem}")

    def consumes(self, available: list[str]) -> list[str]:
        if self.from_ is None and "baseline" not in available:
            known = ", ".join(available) or "none"
            raise ValueError(
                f"from: no 'baseline' variant to distil from; name the teacher (variants here: {known})"
            )
        teachers = list(self.from_) if self.from_ is not None else ["baseline"]
        if len(teachers) != 1:
            raise ValueError(
                f"from: the distill stage takes exactly one teacher variant, got {len(teachers)} "
                f"({', '.join(teachers) or 'none'})"
            )
        return teachers

    def produces(self, inputs: list[str]) -> list[str]:
        return [self.output, self.output + SCRATCH_SUFFIX] if self.control else [self.output]

    def architecture(self, variant: str, inputs: list[str], pipeline: Any) -> dict[str, Any] | None:
        return self.student.spec()


@dataclass(frozen=True)
class _Setup:
    """What is fixed before the first student trains, shared by the seed loop, the metrics and the
    Variants, so those helpers take one value instead of a dozen loose ones."""

    teacher: nn.Module
    teacher_spec: ModelSpec
    student_spec: ModelSpec
    teacher_size: dict[str, int]
    student_size: dict[str, int]
    teacher_test: float | None
    teacher_val: float | None
    file_sha_before: str
    weights_sha_before: str
    cached: torch.Tensor | None


@stage("distill", DistillConfig, version=2, distributed=True)
def run(cfg: DistillConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    stage_started = time.perf_counter()
    source = inputs[0]
    _require_torch_teacher(cfg, source)
    bundle = ctx.data()
    setup = _prepare(cfg, source, bundle, ctx)
    runs = _train_all_seeds(cfg, setup, bundle, ctx, out_dir)
    shas_after = _verify_teacher_unchanged(source, setup)
    summary = _summarise(runs, setup.teacher_test, setup.teacher_val, cfg)
    metrics = _stage_metrics(cfg, source, setup, summary, runs, shas_after, stage_started)
    write_json(
        out_dir / "distill.json",
        {"student_spec": setup.student_spec, "teacher_spec": setup.teacher_spec, **metrics},
    )
    return StageResult(
        variants=_build_variants(cfg, source, setup, runs, summary, metrics, ctx, out_dir),
        metrics=metrics,
        publish={"distill.json": f"{cfg.label}.json"},
    )


def _require_torch_teacher(cfg: DistillConfig, source: Variant) -> None:
    """Refuse an exported teacher before any data is loaded: training needs its PyTorch forward."""
    if source.format != "torch":
        raise ConfigError(
            f"stage {cfg.label!r}: teacher {source.name!r} is an {source.format} model, which cannot "
            "run inside PyTorch training; distil from a torch variant (e.g. the one it was made from)"
        )


def _prepare(cfg: DistillConfig, source: Variant, bundle: DataBundle, ctx: Context) -> _Setup:
    """Load and check the teacher, checksum it, size both models, score the teacher and decide on
    the logit cache: everything the students' training and the report need, done once."""
    teacher, teacher_spec = source.load_torch()
    fields = bundle.model_fields()
    mismatched = {k: (teacher_spec.get(k), v) for k, v in fields.items() if teacher_spec.get(k) != v}
    if mismatched:
        shown = ", ".join(f"{k} {a} (teacher) vs {b} (data)" for k, (a, b) in mismatched.items())
        raise ConfigError(f"stage {cfg.label!r}: teacher {source.name!r} does not fit the dataset: {shown}")
    file_sha_before = sha256_file(source.file)
    weights_sha_before = _state_checksum(teacher)

    spec: ModelSpec = {**cfg.student.spec(), **fields}
    teacher_size = _size(teacher, bundle)
    student_size = _size(build_model(spec), bundle)
    teacher.to(ctx.device)
    teacher_test = _tested(teacher, bundle, ctx).get("accuracy")
    teacher_val = _val_accuracy(teacher, bundle, ctx)
    ctx.log.info(
        "%s: teacher %s (%s, %d parameters, test %s) -> student %s (%d parameters, %.1fx fewer), "
        "T=%s alpha=%s, %d seed(s), control %s",
        cfg.label,
        source.name,
        teacher_spec.get("torchvision") or teacher_spec.get("timm") or teacher_spec.get("arch"),
        teacher_size["parameters"],
        _shown(teacher_test),
        cfg.student.label,
        student_size["parameters"],
        teacher_size["parameters"] / student_size["parameters"],
        cfg.temperature,
        cfg.alpha,
        cfg.seeds,
        "on" if cfg.control else "off",
    )

    # the teacher's logits are the same every epoch only without augmentation, and a feature
    # loss needs its features too
    use_cache = cfg.cache_teacher_logits and cfg.augment == "none" and cfg.loss == "kd"
    return _Setup(
        teacher=teacher,
        teacher_spec=teacher_spec,
        student_spec=spec,
        teacher_size=teacher_size,
        student_size=student_size,
        teacher_test=teacher_test,
        teacher_val=teacher_val,
        file_sha_before=file_sha_before,
        weights_sha_before=weights_sha_before,
        cached=teacher_logits(teacher, bundle, ctx.device) if use_cache else None,
    )


def _train_all_seeds(
    cfg: DistillConfig, setup: _Setup, bundle: DataBundle, ctx: Context, out_dir: Path
) -> list[dict[str, Any]]:
    """Train the distilled student (and its scratch control) once per seed; one row per run.

    The first seed's models are saved as the shipped variants, so the result never depends on a
    best-of-N pick across seeds.
    """
    # A tuning trial scores the distilled student alone (on validation data): the control and the
    # extra seeds measure the final variant, not a setting.
    kinds = ["distilled", "scratch"] if cfg.control and not ctx.tuning else ["distilled"]
    runs: list[dict[str, Any]] = []
    for index in range(1 if ctx.tuning else cfg.seeds):
        seed = ctx.seed + index
        for kind in kinds:
            features = FeatureDistillation(cfg.loss, cfg.feature_weight) if cfg.loss != "kd" else None
            distill = Distillation(setup.teacher, cfg.temperature, cfg.alpha, setup.cached, features)
            distill = distill if kind == "distilled" else None
            model, row = _train_one(cfg, setup.student_spec, bundle, ctx, out_dir, seed, kind, distill)
            runs.append(row)
            if index == 0:  # the shipped variants are the first seed's, never a best-of-N pick
                save_model(model.cpu(), setup.student_spec, out_dir / f"{kind}.pt")
    return runs


def _verify_teacher_unchanged(source: Variant, setup: _Setup) -> tuple[str, str]:
    """Re-checksum the teacher's weights and file, failing loudly if training touched either.

    Returns ``(file_sha_after, weights_sha_after)`` for the report.
    """
    weights_sha_after = _state_checksum(setup.teacher)
    file_sha_after = sha256_file(source.file)
    if weights_sha_after != setup.weights_sha_before or file_sha_after != setup.file_sha_before:
        raise RuntimeError(f"teacher {source.name!r} changed during distillation; this is a bug")
    return file_sha_after, weights_sha_after


def _stage_metrics(
    cfg: DistillConfig,
    source: Variant,
    setup: _Setup,
    summary: dict[str, Any],
    runs: list[dict[str, Any]],
    shas_after: tuple[str, str],
    stage_started: float,
) -> dict[str, Any]:
    """The stage's metrics (also the body of distill.json): sizes, settings, the seed summary,
    the teacher checksums and every run, in the key order the report has always had."""
    file_sha_after, weights_sha_after = shas_after
    teacher_size, student_size = setup.teacher_size, setup.student_size
    return {
        "teacher": source.name,
        "teacher_test_accuracy": setup.teacher_test,
        "teacher_val_accuracy": setup.teacher_val,
        "teacher_parameters": teacher_size["parameters"],
        "teacher_macs": teacher_size["macs"],
        "student_parameters": student_size["parameters"],
        "student_macs": student_size["macs"],
        "parameter_ratio": student_size["parameters"] / teacher_size["parameters"],
        "mac_ratio": student_size["macs"] / teacher_size["macs"] if teacher_size["macs"] else None,
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "loss": cfg.loss,
        "feature_weight": cfg.feature_weight if cfg.loss != "kd" else None,
        "augment": cfg.augment,
        "seeds": cfg.seeds,
        "epochs": cfg.epochs,
        "teacher_logits_cached": setup.cached is not None,
        **summary,
        "teacher_sha256_before": setup.file_sha_before,
        "teacher_sha256_after": file_sha_after,
        "teacher_weights_sha256_before": setup.weights_sha_before,
        "teacher_weights_sha256_after": weights_sha_after,
        "teacher_unchanged": True,
        # everything the stage did (teacher evaluation, every seed of both students), in seconds
        "stage_seconds": round(time.perf_counter() - stage_started, 2),
        "runs": runs,
    }


def _build_variants(
    cfg: DistillConfig,
    source: Variant,
    setup: _Setup,
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    metrics: dict[str, Any],
    ctx: Context,
    out_dir: Path,
) -> list[Variant]:
    """The distilled student and, if trained, its scratch control, both from the first seed's runs
    (the ones saved to disk), each also carrying the all-seed mean and spread."""
    first = {row["kind"]: row for row in runs if row["seed"] == ctx.seed}
    common = {
        "parameters": setup.student_size["parameters"],
        "macs": setup.student_size["macs"],
        "parameter_ratio": metrics["parameter_ratio"],
        "mac_ratio": metrics["mac_ratio"],
        "epochs": cfg.epochs,
    }
    student = Variant(
        name=cfg.output,
        format="torch",
        file=out_dir / "distilled.pt",
        stage=cfg.label,
        parent=source.name,
        metrics=_variant_metrics(first["distilled"], common, summary, "distilled"),
        info={
            "arch": cfg.student.arch,
            "spec": setup.student_spec,
            "teacher": source.name,
            "temperature": cfg.temperature,
            "alpha": cfg.alpha,
            "seed": ctx.seed,
            "curves": first["distilled"]["curves"],
        },
    )
    variants = [student]
    if "scratch" in first:
        variants.append(
            Variant(
                name=cfg.output + SCRATCH_SUFFIX,
                format="torch",
                file=out_dir / "scratch.pt",
                stage=cfg.label,
                parent=None,
                metrics=_variant_metrics(first["scratch"], common, summary, "scratch"),
                info={
                    "arch": cfg.student.arch,
                    "spec": setup.student_spec,
                    "control_for": cfg.output,
                    "note": f"control: {cfg.output}'s architecture, budget, initialisation and seed, "
                    "trained from scratch on hard labels without the teacher",
                    "seed": ctx.seed,
                    "curves": first["scratch"]["curves"],
                },
            )
        )
    return variants


def _train_one(
    cfg: DistillConfig,
    spec: ModelSpec,
    bundle: DataBundle,
    ctx: Context,
    out_dir: Path,
    seed: int,
    kind: str,
    distill: Distillation | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one student; distilled and scratch runs with the same seed start from the same weights."""
    torch.manual_seed(seed)
    model = build_model(spec, pretrained=True)  # model.weights, if the student names pretrained ones
    workdir = out_dir / "work" / f"seed{seed}-{kind}"
    started, cpu_started = time.perf_counter(), time.process_time()
    result = fit(
        model,
        bundle,
        cfg,
        ctx.device,
        seed,
        workdir,
        desc=f"{cfg.label} {kind} seed {seed}",
        distill=distill,
        on_epoch=ctx.on_epoch if kind == "distilled" else None,
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    test = _tested(model, bundle, ctx)
    row = {
        "seed": seed,
        "kind": kind,
        "test_accuracy": test.get("accuracy"),
        "test_correct": test.get("correct"),
        "test_count": test.get("count"),
        "val_accuracy": _val_accuracy(model, bundle, ctx),
        "train_seconds": round(wall, 2),
        "train_cpu_seconds": round(cpu, 2),
        "resumed_from_epoch": result.resumed_from_epoch,
        "curves": f"work/{workdir.name}/history.json",
        "batchnorm": result.batchnorm,  # the BatchNorm adaptation after training (compress.batchnorm)
        "training_settings": result.derived,  # batch size and lr auto's rate when left open
    }
    ctx.log.info(
        "%s: seed %d %s student: test %s val %s (%.1fs)",
        cfg.label,
        seed,
        kind,
        _shown(row["test_accuracy"]),
        f"{row['val_accuracy']:.4f}" if row["val_accuracy"] is not None else "n/a",
        wall,
    )
    return model, row


def _summarise(
    runs: list[dict[str, Any]], teacher_test: float | None, teacher_val: float | None, cfg: DistillConfig
) -> dict[str, Any]:
    """Means, standard deviations, the gap share and the verdict over all seeds."""
    out: dict[str, Any] = {}
    if teacher_test is None:  # a tuning trial: only validation accuracy exists
        vals = [r["val_accuracy"] for r in runs if r["val_accuracy"] is not None]
        out["distilled_val_accuracy_mean"] = statistics.fmean(vals) if vals else None
        out["teacher_minus_student_val"] = (
            teacher_val - out["distilled_val_accuracy_mean"] if vals and teacher_val is not None else None
        )
        out["verdict"] = "tuning trial: scored on validation data, no control"
        return out
    acc: dict[str, list[float]] = {}
    for kind in ("distilled", "scratch"):
        rows = [r for r in runs if r["kind"] == kind]
        if not rows:
            continue
        acc[kind] = [r["test_accuracy"] for r in rows]
        vals = [r["val_accuracy"] for r in rows if r["val_accuracy"] is not None]
        out[f"{kind}_test_accuracy_mean"] = statistics.fmean(acc[kind])
        out[f"{kind}_test_accuracy_std"] = statistics.stdev(acc[kind]) if len(rows) > 1 else None
        out[f"{kind}_val_accuracy_mean"] = statistics.fmean(vals) if vals else None
        out[f"{kind}_seconds_mean"] = statistics.fmean(r["train_seconds"] for r in rows)
        out[f"{kind}_cpu_seconds_mean"] = statistics.fmean(r["train_cpu_seconds"] for r in rows)
    # wall time is what the user waits for; CPU time (all threads) shows what it cost when
    # other jobs share the machine
    out["seconds_per_seed"] = sum(out.get(f"{k}_seconds_mean", 0.0) for k in acc)
    out["cpu_seconds_per_seed"] = sum(out.get(f"{k}_cpu_seconds_mean", 0.0) for k in acc)
    if "scratch" not in acc:
        out["verdict"] = "no control trained (control: false): the gain of distillation is not measured"
        return out
    distilled, scratch = out["distilled_test_accuracy_mean"], out["scratch_test_accuracy_mean"]
    out["gain"] = distilled - scratch
    out["teacher_minus_scratch"] = teacher_test - scratch
    out["gap_closed"] = out["gain"] / out["teacher_minus_scratch"] if teacher_test - scratch > 0 else None
    if len(acc["distilled"]) < 2:
        out["gain_std"] = None
        out["verdict"] = "one seed: no error bar, so no claim either way (use seeds: 3 or more)"
        return out
    # Pooled standard deviation of the test accuracy of one student across seeds.
    pooled = math.sqrt((out["distilled_test_accuracy_std"] ** 2 + out["scratch_test_accuracy_std"] ** 2) / 2)
    out["gain_std"] = pooled
    out["gain_in_std"] = out["gain"] / pooled if pooled > 0 else None
    if abs(out["gain"]) < 2 * pooled or pooled == 0 and out["gain"] == 0:
        out["verdict"] = "no measurable gain"
    elif out["gain"] > 0:
        out["verdict"] = f"distillation helps: +{100 * out['gain']:.2f} pp (> 2 std of {100 * pooled:.2f} pp)"
    else:
        out["verdict"] = f"distillation hurts: {100 * out['gain']:.2f} pp (> 2 std of {100 * pooled:.2f} pp)"
    return out


def _variant_metrics(
    row: dict[str, Any], common: dict[str, Any], summary: dict[str, Any], kind: str
) -> dict[str, Any]:
    return {
        "test_accuracy": row["test_accuracy"],
        "test_correct": row["test_correct"],
        "test_count": row["test_count"],
        "val_accuracy": row["val_accuracy"],
        **common,
        "train_seconds": row["train_seconds"],
        "resumed_from_epoch": row["resumed_from_epoch"],
        "test_accuracy_mean": summary.get(f"{kind}_test_accuracy_mean"),
        "test_accuracy_std": summary.get(f"{kind}_test_accuracy_std"),
        "gap_closed": summary.get("gap_closed"),
    }


def _tested(model: nn.Module, bundle: DataBundle, ctx: Context) -> dict[str, Any]:
    """The test split's evaluation; empty inside a tuning trial, where that split is off limits."""
    return {} if ctx.tuning else evaluate(model, bundle, bundle.test, ctx.device)


def _shown(accuracy: float | None) -> str:
    return "n/a" if accuracy is None else f"{accuracy:.4f}"


def _val_accuracy(model: nn.Module, bundle: DataBundle, ctx: Context) -> float | None:
    return evaluate(model, bundle, bundle.val, ctx.device)["accuracy"] if len(bundle.val) else None


def _state_checksum(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict, in order: proves the weights did not move."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _size(model: nn.Module, bundle: DataBundle) -> dict[str, int]:
    sample = torch.zeros(1, *bundle.input_shape)
    return {"parameters": count_parameters(model), "macs": count_macs(model.cpu(), sample).macs}
