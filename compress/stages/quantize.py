"""Stage ``quantize``: int8 variants of earlier variants, in onnxruntime or PyTorch (torchao).

Per parent ``P`` and mode it adds ``P.int8-dynamic`` / ``P.int8-static`` (onnxruntime, the
files edge teams receive; ``fp16``: ``P.fp16``, fp16 weights and compute with fp32 I/O, for
targets without int8 kernels; ``weight-only`` with the pytorch backend: ``P.pt-int8-weight-only``,
int8 Linear weights with float activations) or ``P.pt-int8-dynamic`` / ``P.pt-int8-static`` (PyTorch, always
with the ``pt-`` prefix so both backends can quantize the same parent in one pipeline;
``suffix:`` overrides the middle part). Calibration uses training images only. A static
variant that loses more than ``tolerance`` pp on the validation split gets its most
sensitive layers kept in fp32; with ``prefer: latency`` the onnxruntime backend also leaves
in fp32 whatever measurably makes the int8 model slower. Every try is written to
``quantize.json`` (published as ``reports/<pipeline>/<stage name>.json``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from compress import measure
from compress import quantization as q
from compress.config import (
    BN_ADAPT_BATCHES,
    MAX_BN_ADAPT_BATCHES,
    OptimizerConfig,
    SoftLabels,
    StageConfig,
    StrictModel,
    TrainingConfig,
)
from compress.context import Context
from compress.data import calibration_images
from compress.errors import ArtifactError
from compress.fileio import write_json
from compress.quantization.job import Job
from compress.quantization.modes import quantize_parent
from compress.stages import stage
from compress.variants import StageResult, Variant

ORT_ONLY = ("per_channel", "activation_type", "weight_type", "op_types")


class CalibrationConfig(StrictModel):
    """Static quantization's calibration: which training images set the activation ranges, and how."""

    images: int = Field(1024, gt=0, le=1_000_000, description="Training images for static calibration.")
    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="onnxruntime's calibration method: minmax, entropy or percentile."
    )
    percentile: float = Field(
        99.999, gt=50, le=100, description="With method: percentile, the percentile of activations kept."
    )
    batch_size: int = Field(64, gt=0, le=65536, description="Calibration batch size.")

    @model_validator(mode="after")
    def _percentile_needs_method(self) -> CalibrationConfig:
        if "percentile" in self.model_fields_set and self.method != "percentile":
            raise ValueError("percentile applies only with method: percentile")
        return self


class LatencyConfig(StrictModel):
    """How int8 is timed against fp32: the recorded speed-up and the prefer: latency search."""

    batch_size: int = Field(64, gt=0, le=65536, description="Batch size of the timed calls.")
    threads: int = Field(1, ge=1, le=256, description="onnxruntime intra-op threads while timing.")
    rounds: int = Field(15, ge=1, le=1000, description="Interleaved timing rounds per candidate.")
    runs: int = Field(3, ge=1, le=1000, description="Calls per round, averaged.")
    margin: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="A change is kept only when it is this share faster (0.05 = 5 %), twice.",
    )


class QatConfig(TrainingConfig):
    """Quantization-aware fine-tuning (modes ``qat`` and ``auto``): the usual training options, a
    short low-learning-rate schedule by default, optional distillation from the fp32 parent, and
    the points (shares of all steps) where observers and batch norms freeze."""

    epochs: int = Field(2, ge=1, le=1000, description="Quantization-aware training epochs.")
    optimizer: OptimizerConfig = Field(
        OptimizerConfig(name="sgd", lr=0.005, momentum=0.9, weight_decay=5e-5),
        description="The optimizer: its name, learning rate, momentum and weight decay.",
    )
    schedule: Literal["constant", "cosine", "onecycle"] = Field(
        "cosine", description="Learning-rate schedule: cosine, onecycle or constant."
    )
    distill: SoftLabels | None = Field(
        None, description="Also learn from the fp32 parent's soft labels; null: hard labels only."
    )
    # the weight grid's bits (still stored as int8): 8 is what int8 kernels expect; fewer is a
    # harder target that shows what training against the grid buys
    weight_bits: int = Field(
        8, ge=2, le=8, description="Bits of the weight grid (stored as int8); fewer than 8 is a harder grid."
    )
    freeze_observers_at: float = Field(
        0.6, ge=0, le=1, description="Share of all steps after which the observers freeze; 1: never."
    )
    freeze_bn_at: float = Field(
        0.6, ge=0, le=1, description="Share of all steps after which BatchNorm statistics freeze; 1: never."
    )
    bn_adapt_batches: int = Field(
        BN_ADAPT_BATCHES,
        ge=0,
        le=MAX_BN_ADAPT_BATCHES,
        description="Refused here: set bn_adapt_batches on the quantize stage (applied before QAT starts).",
        json_schema_extra={"not": {}},  # _adapted_before_qat refuses any value
    )

    @field_validator("bn_adapt_batches")
    @classmethod
    def _adapted_before_qat(cls, value: int) -> int:
        raise ValueError(
            "the batch norms are re-estimated once, before QAT starts (in the exported graph they are "
            "no longer modules); set bn_adapt_batches on the quantize stage instead"
        )


class QuantizeConfig(StageConfig):
    """int8 (and fp16) variants of earlier variants, in onnxruntime or PyTorch (torchao)."""

    stage: Literal["quantize"] = Field(description="Makes int8 or fp16 variants of earlier variants.")
    tunable: ClassVar[bool] = True
    backend: Literal["onnxruntime", "pytorch"] = Field(
        "onnxruntime", description="onnxruntime (the files edge teams receive) or pytorch (torchao)."
    )
    modes: list[Literal["dynamic", "static", "fp16", "weight-only", "qat", "auto"]] = Field(
        default_factory=lambda: ["dynamic", "static"],
        min_length=1,
        description="Variants to make, each once: dynamic, static, fp16, qat, auto (onnxruntime) or "
        "weight-only (pytorch).",
        json_schema_extra={"uniqueItems": True},  # _unique_modes
    )
    calibration: CalibrationConfig = Field(
        CalibrationConfig(), description="Static calibration: images, method and batch size."
    )
    per_channel: bool = Field(False, description="onnxruntime: per-channel weight scales.")
    # 7-bit weights: "auto" on an x86 CPU without VNNI, where full-range int8 clips (see
    # measure.int8_saturates); true/false to build for another target than this machine
    reduce_range: bool | Literal["auto"] = Field(
        "auto",
        description="7-bit weights; auto: on an x86 CPU without VNNI, where full-range int8 clips; "
        "true/false to build for another CPU.",
    )
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="onnxruntime: activation type.")
    weight_type: Literal["int8", "uint8"] = Field("int8", description="onnxruntime: weight type.")
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul", "Gemm"],
        min_length=1,
        description="onnxruntime dynamic mode: op types quantized (convolutions stay fp32 unless listed).",
        json_schema_extra={"items": {"enum": list(q.DYNAMIC_OP_TYPES), "type": "string"}},  # _known_ops
    )
    tolerance: float | None = Field(
        0.5,
        ge=0,
        le=100,
        description="Largest validation-accuracy drop (percentage points) against the parent; a static "
        "variant that misses it keeps its most sensitive layers in fp32; null: off.",
    )
    prefer: Literal["accuracy", "latency"] = Field(
        "accuracy",
        description="latency (onnxruntime): also keep in fp32 what measurably makes int8 slower, within "
        "tolerance.",
    )
    # static (onnxruntime): also measure each weight layer quantized alone (one validation pass
    # per layer), published in the stage's JSON and charted in the report
    sensitivity: bool = Field(
        False,
        description="static (onnxruntime): also quantize each weight layer alone and record its validation "
        "drop.",
    )
    latency: LatencyConfig = Field(LatencyConfig(), description="Timing for the latency comparisons.")
    qat: QatConfig = Field(
        QatConfig(), description="Modes qat and auto: quantization-aware training (keys as for train)."
    )
    # BatchNorm adaptation before static calibration and QAT: re-estimate the parent's running
    # statistics on this many training batches (on a copy; the parent stays the fp32 reference)
    bn_adapt_batches: int = Field(
        BN_ADAPT_BATCHES,
        ge=0,
        le=MAX_BN_ADAPT_BATCHES,
        description="Training batches that re-estimate a copy of the parent's BatchNorm statistics before "
        "calibration and QAT; 0: off.",
    )
    suffix: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Middle part of the output names; null: int8 (onnxruntime) or pt-int8 (pytorch).",
    )

    @field_validator("modes")
    @classmethod
    def _unique_modes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("list each mode once")
        return value

    @field_validator("op_types")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in q.DYNAMIC_OP_TYPES]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} cannot be dynamically quantized by onnxruntime; "
                f"choose from {', '.join(q.DYNAMIC_OP_TYPES)}"
            )
        return value

    @model_validator(mode="after")
    def _backend_fields(self) -> QuantizeConfig:
        if self.backend == "onnxruntime" and "weight-only" in self.modes:
            raise ValueError(
                "modes: weight-only is torchao's Int8WeightOnlyConfig and needs backend: pytorch "
                "(a second quantize stage with its own name, as in pipelines/mnist.yaml)"
            )
        if "auto" in self.modes and self.tolerance is None:
            raise ValueError(
                "modes: auto trains only when static PTQ misses the tolerance; set tolerance (pp), "
                "or ask for qat directly"
            )
        if "qat" in self.model_fields_set and not {"qat", "auto"} & set(self.modes):
            raise ValueError("qat: settings apply to modes qat and auto; add one of them to modes")
        if self.backend == "pytorch":
            if {"qat", "auto"} & set(self.modes):
                raise ValueError(
                    "modes: qat/auto make a QDQ ONNX file for onnxruntime and need backend: onnxruntime"
                )
            ort_only = [f for f in ORT_ONLY if f in self.model_fields_set]
            calibration_set = self.calibration.model_fields_set
            ort_only += [f"calibration.{f}" for f in ("method", "percentile") if f in calibration_set]
            if ort_only:
                raise ValueError(
                    f"{', '.join(ort_only)} apply only to backend: onnxruntime; the pytorch backend uses "
                    "torchao's X86 inductor quantizer settings (uint8 histogram-calibrated activations, "
                    "int8 per-channel weights)"
                )
            if self.prefer == "latency":
                raise ValueError(
                    "prefer: latency is implemented for backend: onnxruntime only (the runtime that ships)"
                )
            if self.sensitivity:
                raise ValueError(
                    "sensitivity: the per-layer analysis is implemented for backend: onnxruntime"
                )
            if "fp16" in self.modes:
                raise ValueError("modes: fp16 makes an ONNX file and needs backend: onnxruntime")
        return self

    @property
    def tag(self) -> str:
        return self.suffix or ("int8" if self.backend == "onnxruntime" else "pt-int8")

    def consumes(self, available: list[str]) -> list[str]:
        if self.from_ is not None:
            if not self.from_:
                raise ValueError("from: name at least one variant to quantize")
            return list(dict.fromkeys(self.from_))
        if "baseline" not in available:
            raise ValueError(
                "from: no 'baseline' variant here to quantize by default; name the variants "
                f"to quantize (available: {', '.join(available) or 'none'})"
            )
        return ["baseline"]

    def produces(self, inputs: list[str]) -> list[str]:
        return [self.output_name(parent, mode) for parent in inputs for mode in self.modes]

    def output_name(self, parent: str, mode: str) -> str:
        if mode == "fp16":  # not an int8 variant: no int8 tag unless a suffix is given
            return f"{parent}.{self.suffix}-fp16" if self.suffix else f"{parent}.fp16"
        return f"{parent}.{self.tag}-{mode}"

    @property
    def effective_reduce_range(self) -> bool:
        """``reduce_range`` resolved for this machine."""
        return measure.int8_saturates() if self.reduce_range == "auto" else self.reduce_range

    def ort_settings(self) -> q.OrtSettings:
        return q.OrtSettings(
            per_channel=self.per_channel,
            reduce_range=self.effective_reduce_range,
            activation_type=self.activation_type,
            weight_type=self.weight_type,
            dynamic_op_types=list(self.op_types),
            calibration_method=self.calibration.method,
            percentile=self.calibration.percentile,
            calibration_batch=self.calibration.batch_size,
        )


@stage("quantize", QuantizeConfig, version=3, concurrent=True)
def run(cfg: QuantizeConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    _check_inputs(cfg, inputs)
    bundle = ctx.data()
    count = min(cfg.calibration.images, len(bundle.train))
    images = calibration_images(bundle, count, seed=ctx.seed)
    sample = measure.fixed_inputs(images, cfg.latency.batch_size)
    ctx.log.info(
        "quantize (%s): %s, modes %s, %d training images for calibration",
        cfg.backend,
        ", ".join(p.name for p in inputs),
        "/".join(cfg.modes),
        count,
    )
    variants: list[Variant] = []
    report: dict[str, Any] = {"backend": cfg.backend, "calibration_images": count, "variants": {}}
    problems: dict[str, str] = {}
    adapted: dict[str, Any] = {}  # parent -> its BatchNorm adaptation's record
    for parent in inputs:
        model, _ = parent.load_torch()
        job = Job(cfg, parent, model.eval(), bundle, images, sample, ctx, out_dir)
        for variant, record in quantize_parent(job):
            report["variants"][record["name"]] = record
            if variant is not None:
                variants.append(variant)
            else:
                problems[record["name"]] = record.get("save_error", "not saved")
        if job.batchnorm is not None:
            adapted[parent.name] = report.setdefault("batchnorm", {})[parent.name] = job.batchnorm
    shutil.rmtree(out_dir / "work", ignore_errors=True)
    write_json(out_dir / "quantize.json", report)
    metrics = _stage_metrics(cfg, report, adapted, problems)
    if problems:
        ctx.log.warning("quantize: evaluated but could not save: %s", problems)
    return StageResult(variants=variants, metrics=metrics, publish={"quantize.json": f"{cfg.label}.json"})


def _check_inputs(cfg: QuantizeConfig, inputs: list[Variant]) -> None:
    """Quantize starts from PyTorch models: an exported file has lost what calibration and QAT need."""
    for parent in inputs:
        if parent.format != "torch":
            raise ArtifactError(
                f"stage {cfg.label!r}: variant {parent.name!r} is a {parent.format} file; quantize "
                "takes PyTorch variants (e.g. baseline, pruned, student), not already-exported ones"
            )


def _stage_metrics(
    cfg: QuantizeConfig, report: dict[str, Any], adapted: dict[str, Any], problems: dict[str, str]
) -> dict[str, Any]:
    """The stage's summary in the manifest: each variant's headline numbers (the full records are in
    ``quantize.json``), the BatchNorm adaptations and the variants that could not be saved."""
    metrics = {
        "backend": cfg.backend,
        "calibration_images": report["calibration_images"],
        "variants": {name: _brief(r["metrics"]) for name, r in report["variants"].items()},
    }
    if adapted:
        metrics["batchnorm"] = adapted
    if problems:
        metrics["not_saved"] = problems
    return metrics


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "test_accuracy",
        "delta_test_pp",
        "delta_val_pp",
        "meets_tolerance",
        "size_ratio",
        "latency_ms_p50",
        "fp32_latency_ms_p50",
        "speedup",
        "slower_than_parent",
        "fp32_layers",
    )
    return {k: metrics.get(k) for k in keys}
