"""One parent variant quantized in every mode the stage asks for: what the modes share, the
metrics each int8 variant records, and the accuracy-aware fallback step.

The stage's config reaches this package as the ``QuantizeSpec`` protocol, so the mechanics never
import the stages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compress.batchnorm import adapt_batchnorm
from compress.context import Context
from compress.data import DataBundle
from compress.measure import count_parameters
from compress.quantization import ort
from compress.quantization import search as fallbacks
from compress.variants import Variant


class QuantizeSpec(Protocol):
    """What the quantize stage's config offers the backends (``stages.quantize.QuantizeConfig``)."""

    backend: str
    modes: list[str]
    tolerance: float | None
    prefer: str
    effective_reduce_range: bool  # reduce_range resolved for this machine
    sensitivity: bool
    calibration: Any
    latency: Any
    bn_adapt_batches: int  # BatchNorm adaptation before static calibration and QAT (0: off)
    qat: Any  # QatConfig: a TrainingConfig plus distill, weight_bits and the freezing points

    def output_name(self, parent: str, mode: str) -> str: ...

    def ort_settings(self) -> ort.OrtSettings: ...


@dataclass
class Job:
    """What every mode of one parent shares."""

    cfg: QuantizeSpec
    parent: Variant
    model: nn.Module
    bundle: DataBundle
    images: torch.Tensor
    sample: torch.Tensor  # the latency batch
    ctx: Context
    out_dir: Path
    batchnorm: dict[str, Any] | None = None  # the BatchNorm adaptation's record, once it ran
    _calibrated: nn.Module | None = field(default=None, repr=False)

    def calibration_model(self) -> nn.Module:
        """The parent with its BatchNorm statistics re-estimated on training images, for the
        modes that calibrate or train (static, PTQ, QAT): a stale running average would become
        the int8 file's folded scales. In a PT2E graph BatchNorm is no longer a module, so the
        eager fp32 model is adapted before export. The parent itself stays untouched: it is the
        fp32 reference every variant is compared with. The parent when nothing changed (no
        BatchNorm, ``bn_adapt_batches: 0``, or its own statistics score higher on validation).
        """
        if self._calibrated is None:
            model = copy.deepcopy(self.model)
            self.batchnorm = adapt_batchnorm(
                model,
                self.bundle,
                self.ctx.device,
                self.cfg.bn_adapt_batches,
                self.ctx.seed,
                f"quantize {self.parent.name}",
                logger=self.ctx.log,
            )
            changed = self.batchnorm is not None and self.batchnorm["kept"]
            self._calibrated = model.cpu().eval() if changed else self.model
        return self._calibrated


@dataclass
class Reference:
    """The parent as onnxruntime runs it, measured once for every mode: its fp32 ONNX file, its
    validation and test accuracy there, its size and a latency runner on the timing batch."""

    fp32: Path
    val: float | None
    test: dict[str, Any]
    sizes: dict[str, int]
    runner: Callable[[], Any]


def accuracy_step(
    cfg: QuantizeSpec,
    mode: str,
    candidates: list[str],
    val_accuracy: Callable[[list[str]], float],
    parent_val: float | None,
    has_val: bool,
) -> tuple[list[str], list[fallbacks.Try], list[dict[str, Any]]]:
    """The accuracy-aware fallback for static variants; a single measured try otherwise."""
    if not has_val:
        return [], [], []
    if mode == "static" and cfg.tolerance is not None:
        return fallbacks.accuracy_fallback(candidates, val_accuracy, parent_val, cfg.tolerance)
    acc = val_accuracy([])
    ok = fallbacks.meets(parent_val, acc, cfg.tolerance)
    note = f"{mode}: no fallback" if mode in ("dynamic", "fp16") else "tolerance: null"
    return [], [fallbacks.Try([], acc, fallbacks.drop_pp(parent_val, acc), ok, note)], []


def test_accuracy(job: Job, accuracy: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """The test split's accuracy, or Nones inside a tuning trial, where that split is off limits."""
    if job.ctx.tuning:
        return {"accuracy": None, "correct": None, "count": None}
    return accuracy(job.bundle.test)


def variant_metrics(
    job: Job,
    mode: str,
    val: float | None,
    test: dict[str, Any],
    parent_val: float | None,
    parent_test: dict[str, Any],
    sizes: dict[str, int | None],
    fp32_sizes: dict[str, int],
    fp32_ms: dict[str, float],
    int8_ms: dict[str, float],
    excluded: list[str],
    weight_layers: list[str],
) -> dict[str, Any]:
    cfg = job.cfg
    tested = test["accuracy"] is not None and parent_test["accuracy"] is not None
    delta_test = (test["accuracy"] - parent_test["accuracy"]) * 100 if tested else None
    delta_val = (val - parent_val) * 100 if val is not None and parent_val is not None else None
    size = sizes["bytes"]
    return {
        "test_accuracy": test["accuracy"],
        "test_correct": test["correct"],
        "test_count": test["count"],
        "val_accuracy": val,
        "parent_test_accuracy": parent_test["accuracy"],
        "parent_val_accuracy": parent_val,
        "delta_test_pp": round(delta_test, 4) if delta_test is not None else None,
        "delta_val_pp": round(delta_val, 4) if delta_val is not None else None,
        "tolerance_pp": cfg.tolerance,
        "meets_tolerance": (
            fallbacks.meets(parent_val, val, cfg.tolerance)
            if val is not None and parent_val is not None
            else None
        ),
        "parameters": count_parameters(job.model),
        "file_bytes": size,
        "file_gzip_bytes": sizes["gzip_bytes"],
        "fp32_file_bytes": fp32_sizes["bytes"],
        "fp32_file_gzip_bytes": fp32_sizes["gzip_bytes"],
        "size_ratio": round(fp32_sizes["bytes"] / size, 3) if size else None,
        "latency_batch": cfg.latency.batch_size,
        "latency_threads": cfg.latency.threads,
        "latency_ms_p50": int8_ms["p50_ms"],
        "latency_ms_min": int8_ms["min_ms"],
        "fp32_latency_ms_p50": fp32_ms["p50_ms"],
        "fp32_latency_ms_min": fp32_ms["min_ms"],
        "speedup": round(fp32_ms["p50_ms"] / int8_ms["p50_ms"], 3) if int8_ms["p50_ms"] else None,
        "slower_than_parent": bool(int8_ms["p50_ms"] > fp32_ms["p50_ms"]),
        "calibration_images": len(job.images) if mode == "static" else 0,
        "calibration_method": _calibration_method(cfg) if mode == "static" else None,
        "fp32_layers": excluded,
        "quantized_layers": [n for n in weight_layers if n not in excluded],
        "prefer": cfg.prefer,
    }


def _calibration_method(cfg: QuantizeSpec) -> str:
    return cfg.calibration.method if cfg.backend == "onnxruntime" else "histogram (torchao X86 default)"


def log_variant(log: Any, name: str, m: dict[str, Any]) -> None:
    if m["test_accuracy"] is None:  # a tuning trial
        log.info("quantize: %s val %s (tuning trial: no test split)", name, m["val_accuracy"])
        return
    log.info(
        "quantize: %s test %.4f (%+.2f pp vs fp32 %.4f), %s bytes (%.2fx smaller), %.2f ms vs fp32 %.2f ms "
        "at batch %d / %d thread(s)%s; fp32 layers: %s",
        name,
        m["test_accuracy"],
        m["delta_test_pp"],
        m["parent_test_accuracy"],
        m["file_bytes"],
        m["size_ratio"] or 0,
        m["latency_ms_p50"],
        m["fp32_latency_ms_p50"],
        m["latency_batch"],
        m["latency_threads"],
        " -- SLOWER than its fp32 parent" if m["slower_than_parent"] else "",
        ", ".join(m["fp32_layers"]) or "none",
    )


def variant_record(job: Job, name: str, mode: str, path: str, metrics: dict[str, Any], **rest: Any) -> dict:
    """The stage's record of one quantized variant: the fields every backend has, then its own
    (searches, settings) in the order given."""
    return {"name": name, "parent": job.parent.name, "mode": mode, "path": path, "metrics": metrics, **rest}


def quantized_variant(
    job: Job, name: str, file_format: str, file: Path, metrics: dict[str, Any], info: dict[str, Any]
) -> Variant:
    """A quantized child of the job's parent, made by this stage; its info ends with the data's
    preprocessing, which the deploy bundle needs to feed the file."""
    return Variant(
        name=name,
        format=file_format,
        file=file,
        stage=job.cfg.label,
        parent=job.parent.name,
        metrics=metrics,
        info={**info, "preprocessing": job.bundle.preprocessing()},
    )
