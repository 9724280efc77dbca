"""One teacher distilled into a student, with its from-scratch control: the distill stage's mechanics.

The student learns from ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``
(``losses.kd_loss``, taken per batch by ``teacher.Distillation.loss`` inside ``training.fit``);
the teacher runs in eval mode under no_grad and is never updated (its file and its in-memory
weights are checksummed before and after). The control is the same architecture trained from
the same initialisation, on hard labels only, with the same budget, batches and seed, so the
stage measures what distillation bought instead of assuming it.

The stage's config reaches this package as the ``DistillSpec`` protocol, so the job never
imports the stages.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from compress.config import ModelConfig
from compress.context import Context
from compress.data import DataBundle
from compress.distillation.losses import FeatureDistillation
from compress.distillation.teacher import Distillation, teacher_logits
from compress.errors import ConfigError
from compress.fileio import sha256_file
from compress.measure import count_macs, count_parameters, evaluate
from compress.models import ModelSpec, build_model, save_model
from compress.training import FitSettings, fit
from compress.variants import Variant


class DistillSpec(Protocol):
    """What the distill stage's config offers the job (``stages.distill.DistillConfig``, itself a
    ``TrainingConfig``: ``fit`` trains every student with it)."""

    label: str
    student: ModelConfig
    temperature: float
    alpha: float
    control: bool
    seeds: int
    output: str
    loss: Literal["kd", "hint", "attention"]
    feature_weight: float
    cache_teacher_logits: bool
    augment: str
    epochs: int


@dataclass(frozen=True)
class Setup:
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


def require_torch_teacher(cfg: DistillSpec, source: Variant) -> None:
    """Refuse an exported teacher before any data is loaded: training needs its PyTorch forward."""
    if source.format != "torch":
        raise ConfigError(
            f"stage {cfg.label!r}: teacher {source.name!r} is an {source.format} model, which cannot "
            "run inside PyTorch training; distil from a torch variant (e.g. the one it was made from)"
        )


@dataclass
class DistillJob:
    """The teacher variant, the data, and what ``prepare`` fixed before the students train."""

    cfg: DistillSpec
    source: Variant
    bundle: DataBundle
    ctx: Context
    out_dir: Path
    setup: Setup

    @classmethod
    def prepare(
        cls, cfg: DistillSpec, source: Variant, bundle: DataBundle, ctx: Context, out_dir: Path
    ) -> DistillJob:
        """Load and check the teacher, checksum it, size both models, score the teacher and decide
        on the logit cache: everything the students' training and the report need, done once."""
        teacher, teacher_spec = source.load_torch()
        fields = bundle.model_fields()
        mismatched = {k: (teacher_spec.get(k), v) for k, v in fields.items() if teacher_spec.get(k) != v}
        if mismatched:
            shown = ", ".join(f"{k} {a} (teacher) vs {b} (data)" for k, (a, b) in mismatched.items())
            raise ConfigError(
                f"stage {cfg.label!r}: teacher {source.name!r} does not fit the dataset: {shown}"
            )
        file_sha_before = sha256_file(source.file)
        weights_sha_before = _state_checksum(teacher)

        spec: ModelSpec = {**cfg.student.spec(), **fields}
        teacher_size = _size(teacher, bundle)
        student_size = _size(build_model(spec), bundle)
        teacher.to(ctx.device)
        teacher_test = _tested(teacher, bundle, ctx).get("accuracy")
        teacher_val = _val_accuracy(teacher, bundle, ctx)
        _log_plan(cfg, source, ctx, teacher_spec, teacher_size, student_size, teacher_test)
        # the teacher's logits are the same every epoch only without augmentation, and a feature
        # loss needs its features too
        use_cache = cfg.cache_teacher_logits and cfg.augment == "none" and cfg.loss == "kd"
        setup = Setup(
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
        return cls(cfg, source, bundle, ctx, out_dir, setup)

    def train_all_seeds(self) -> list[dict[str, Any]]:
        """Train the distilled student (and its scratch control) once per seed; one row per run.

        The first seed's models are saved as the shipped variants, so the result never depends on
        a best-of-N pick across seeds.
        """
        cfg, ctx = self.cfg, self.ctx
        # A tuning trial scores the distilled student alone (on validation data): the control and
        # the extra seeds measure the final variant, not a setting.
        kinds = ["distilled", "scratch"] if cfg.control and not ctx.tuning else ["distilled"]
        runs: list[dict[str, Any]] = []
        for index in range(1 if ctx.tuning else cfg.seeds):
            seed = ctx.seed + index
            for kind in kinds:
                model, row = self.train_one(seed, kind)
                runs.append(row)
                if index == 0:  # the shipped variants are the first seed's, never a best-of-N pick
                    save_model(model.cpu(), self.setup.student_spec, self.out_dir / f"{kind}.pt")
        return runs

    def train_one(self, seed: int, kind: str) -> tuple[nn.Module, dict[str, Any]]:
        """Train one student, ``distilled`` (from the teacher) or ``scratch`` (hard labels only);
        both kinds with the same seed start from the same weights."""
        cfg, ctx, bundle = self.cfg, self.ctx, self.bundle
        torch.manual_seed(seed)
        model = build_model(self.setup.student_spec, pretrained=True)  # model.weights, if named
        workdir = self.out_dir / "work" / f"seed{seed}-{kind}"
        started, cpu_started = time.perf_counter(), time.process_time()
        run = FitSettings(
            cfg,  # the stage's config is its TrainingConfig
            ctx.device,
            seed,
            workdir,
            desc=f"{cfg.label} {kind} seed {seed}",
            distill=self._distillation() if kind == "distilled" else None,
            on_epoch=ctx.on_epoch if kind == "distilled" else None,
        )
        result = fit(model, bundle, run)
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

    def _distillation(self) -> Distillation:
        """The teacher and the KD settings for one distilled student; a fresh feature loss (its
        hint regressor trains with that student alone)."""
        cfg, setup = self.cfg, self.setup
        features = FeatureDistillation(cfg.loss, cfg.feature_weight) if cfg.loss != "kd" else None
        return Distillation(setup.teacher, cfg.temperature, cfg.alpha, setup.cached, features)

    def verify_teacher_unchanged(self) -> tuple[str, str]:
        """Re-checksum the teacher's weights and file, failing loudly if training touched either.

        Returns ``(file_sha_after, weights_sha_after)`` for the report.
        """
        weights_sha_after = _state_checksum(self.setup.teacher)
        file_sha_after = sha256_file(self.source.file)
        if weights_sha_after != self.setup.weights_sha_before or file_sha_after != self.setup.file_sha_before:
            raise RuntimeError(f"teacher {self.source.name!r} changed during distillation; this is a bug")
        return file_sha_after, weights_sha_after


def _log_plan(
    cfg: DistillSpec,
    source: Variant,
    ctx: Context,
    teacher_spec: ModelSpec,
    teacher_size: dict[str, int],
    student_size: dict[str, int],
    teacher_test: float | None,
) -> None:
    """One log line: teacher, student, how much smaller, and the settings the students train with."""
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


def _tested(model: nn.Module, bundle: DataBundle, ctx: Context) -> dict[str, Any]:
    """The test split's evaluation; empty inside a tuning trial, where that split is off limits."""
    return {} if ctx.tuning else evaluate(model, bundle, bundle.test, ctx.device)


def _shown(accuracy: float | None) -> str:
    """An accuracy as the log shows it: four decimals, or n/a."""
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
