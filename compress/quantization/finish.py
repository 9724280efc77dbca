"""The one finishing step every quantize mode ends with: its file measured against the fp32 parent
(accuracy, latency, size), logged, and turned into the stage's record and the ``Variant`` it ships.

A mode only makes its file and says what it searched (``Quantized``); how a quantized variant is
measured and recorded is decided here once, so every backend and mode reports the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress import measure
from compress.data import Split
from compress.quantization import evaluate, ort
from compress.quantization.job import Job, QuantizeSpec
from compress.variants import Variant


@dataclass
class Reference:
    """The fp32 parent as the backend runs it, measured once per parent and shared by every mode:
    its validation and test accuracy, its file sizes and a latency runner on the timing batch."""

    val: float | None
    test: dict[str, Any]
    sizes: dict[str, int]
    runner: Callable[[], Any]
    torch_threads: int | None = None  # PyTorch programs are timed with torch's threads fixed at this


@dataclass
class Quantized:
    """What one mode hands the finishing step: the file it made (None: it could not be saved, which
    the record keeps), how to score and time the shipped program, what stayed in fp32, and what the
    mode adds to the metrics, the record (after its common fields) and the variant's info."""

    mode: str
    name: str
    file: Path | None
    file_format: str  # "onnx" or "pt2"
    path_used: str  # the human-readable recipe
    accuracy: Callable[[Split], dict[str, Any]]  # the shipped program scored on a split
    runner: Callable[[], Any]  # the shipped program on the timing batch
    excluded: list[str] = field(default_factory=list)  # layers kept in fp32
    weight_layers: list[str] = field(default_factory=list)
    scored: tuple[float | None, dict[str, Any]] | None = None  # (val, test) when the mode scored it
    metrics: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scores:
    """One quantized file's own numbers, before they are set beside its parent's."""

    val: float | None
    test: dict[str, Any]
    sizes: dict[str, int | None]
    fp32_ms: dict[str, float]
    int8_ms: dict[str, float]


def finish(job: Job, ref: Reference, made: Quantized) -> tuple[Variant | None, dict[str, Any]]:
    """Measure ``made`` against ``ref``, log it, and return its ``Variant`` (None when its file
    could not be saved) and the stage's record of it."""
    cfg = job.cfg
    val, test = made.scored if made.scored is not None else job.accuracies(made.accuracy)
    pinned = (
        measure.torch_threads(ref.torch_threads)
        if ref.torch_threads is not None
        else contextlib.nullcontext()
    )
    with pinned:
        fp32_ms, int8_ms = evaluate.interleaved_ms(
            [ref.runner, made.runner], cfg.latency.rounds, cfg.latency.runs
        )
    sizes = evaluate.file_sizes(made.file) if made.file is not None else {"bytes": None, "gzip_bytes": None}
    metrics = variant_metrics(job, made, ref, Scores(val, test, sizes, fp32_ms, int8_ms))
    if made.file_format == "onnx":
        metrics.update(ort.int8_initializers(made.file))
    metrics.update(made.metrics)
    log_variant(job.ctx.log, made.name, metrics)
    record = {
        "name": made.name,
        "parent": job.parent.name,
        "mode": made.mode,
        "path": made.path_used,
        "metrics": metrics,
        **made.record,
    }
    if made.file is None:
        return None, record
    variant = Variant(
        name=made.name,
        format=made.file_format,
        file=made.file,
        stage=cfg.label,
        parent=job.parent.name,
        metrics=metrics,
        # the deploy bundle needs the data's preprocessing to feed the file
        info={**made.info, "preprocessing": job.bundle.preprocessing()},
    )
    return variant, record


def variant_metrics(job: Job, made: Quantized, ref: Reference, scores: Scores) -> dict[str, Any]:
    """The metrics every quantized variant records, in this order, whatever its backend and mode."""
    cfg, mode = job.cfg, made.mode
    val, test, fp32_ms, int8_ms = scores.val, scores.test, scores.fp32_ms, scores.int8_ms
    tested = test["accuracy"] is not None and ref.test["accuracy"] is not None
    delta_test = (test["accuracy"] - ref.test["accuracy"]) * 100 if tested else None
    compared = val is not None and ref.val is not None
    delta_val = (val - ref.val) * 100 if compared else None
    size = scores.sizes["bytes"]
    return {
        "test_accuracy": test["accuracy"],
        "test_correct": test["correct"],
        "test_count": test["count"],
        "val_accuracy": val,
        "parent_test_accuracy": ref.test["accuracy"],
        "parent_val_accuracy": ref.val,
        "delta_test_pp": round(delta_test, 4) if delta_test is not None else None,
        "delta_val_pp": round(delta_val, 4) if delta_val is not None else None,
        "tolerance_pp": cfg.tolerance,
        "meets_tolerance": measure.within_tolerance(ref.val, val, cfg.tolerance) if compared else None,
        "parameters": measure.count_parameters(job.model),
        "file_bytes": size,
        "file_gzip_bytes": scores.sizes["gzip_bytes"],
        "fp32_file_bytes": ref.sizes["bytes"],
        "fp32_file_gzip_bytes": ref.sizes["gzip_bytes"],
        "size_ratio": round(ref.sizes["bytes"] / size, 3) if size else None,
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
        "fp32_layers": made.excluded,
        "quantized_layers": [n for n in made.weight_layers if n not in made.excluded],
        "prefer": cfg.prefer,
    }


def _calibration_method(cfg: QuantizeSpec) -> str:
    return cfg.calibration.method if cfg.backend == "onnxruntime" else "histogram (torchao X86 default)"


def log_variant(log: Any, name: str, m: dict[str, Any]) -> None:
    """The variant's one log line: its accuracy, size and latency against its fp32 parent."""
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
