"""Stage ``distill``: train a smaller student from a teacher variant, with a from-scratch control.

The student learns from ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``
(``distillation.losses.kd_loss``); the teacher runs in eval mode under no_grad and is never
updated (its file and its in-memory weights are checksummed before and after). With
``control: true`` the same architecture is trained from the same initialisation, on hard labels
only, with the same budget, batches and seed, so the stage measures what distillation bought
instead of assuming it. With ``seeds: N`` both are trained N times and compared by mean and
standard deviation; a difference under two standard deviations is reported as "no measurable
gain". The mechanics are in ``compress.distillation`` (``job``, ``outcome``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from compress.config import ModelConfig, StageConfig, TrainingConfig
from compress.context import Context
from compress.data import nominal_model_fields
from compress.distillation.job import DistillJob, require_torch_teacher
from compress.distillation.outcome import build_variants, stage_metrics, summarise
from compress.fileio import write_json
from compress.gating import SCRATCH_SUFFIX
from compress.models.builders import size_problem
from compress.stages import stage
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


@stage("distill", DistillConfig, version=2, distributed=True, concurrent=True)
def run(cfg: DistillConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    stage_started = time.perf_counter()
    source = inputs[0]
    require_torch_teacher(cfg, source)
    job = DistillJob.prepare(cfg, source, ctx.data(), ctx, out_dir)
    runs = job.train_all_seeds()
    shas_after = job.verify_teacher_unchanged()
    summary = summarise(runs, job.setup.teacher_test, job.setup.teacher_val)
    metrics = stage_metrics(job, summary, runs, shas_after, stage_started)
    write_json(
        out_dir / "distill.json",
        {"student_spec": job.setup.student_spec, "teacher_spec": job.setup.teacher_spec, **metrics},
    )
    return StageResult(
        variants=build_variants(job, runs, summary, metrics),
        metrics=metrics,
        publish={"distill.json": f"{cfg.label}.json"},
    )
