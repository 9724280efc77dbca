"""Stage ``benchmark``: every variant measured in every runtime it ships in, one table.

Runtimes: ``pytorch`` (eager, torch variants), ``torchscript`` and ``onnxruntime`` (the files the
export stage attached; ONNX-only variants run from their own file when not exported), and the
edge targets' runtimes where the export stage shipped a file: ``ort`` (onnxruntime on the
``.ort`` file), ``openvino`` (OpenVINO CPU on the IR), ``litert`` (the LiteRT interpreter; its
models have batch 1, so batch N is N invocations) and ``executorch`` (XNNPACK-delegated
``.pte``), each through the same loader ``compress.verify`` uses (``compress.ship.targets.runners``). Every
row is measured the same way (``compress.measure``): the same input tensor, the same thread
count, warm-up before timing, accuracy on the whole test split. Deltas are against the
baseline variant in the same runtime, and so are the paired columns (drop interval, flips, worst
class: ``compress.measure.paired``). The table (``compress.results``: its columns are listed
there) goes to ``results.csv`` / ``results.json``, every row's top-1 predictions to
``predictions.npz`` (all published to ``reports/<pipeline>/``), and is the stage's declared
output (``StageResult.table``), which the gates and the report read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from compress import measure
from compress.config import StageConfig
from compress.context import Context
from compress.fileio import write_json
from compress.measure import paired
from compress.results import PREDICTIONS_FILE, RESULTS_JSON, Predictions, ResultsTable, columns
from compress.ship.runtimes import (
    FILE_FORMAT,
    RUNTIMES,
    export_report,
    package_version,
    runner_for,
    runtime_version,
    target_of,
)
from compress.stages import stage
from compress.variants import StageResult, Variant

if TYPE_CHECKING:
    import pandas as pd


class BenchmarkConfig(StageConfig):
    """Measure every variant in every runtime it ships in: accuracy, latency, size, one table."""

    stage: Literal["benchmark"] = Field(description="Measures every variant in every runtime it ships in.")
    runtimes: list[
        Literal["pytorch", "torchscript", "onnxruntime", "ort", "openvino", "litert", "executorch"]
    ] = Field(
        list(RUNTIMES),
        description="Runtimes to measure, each once; a runtime a variant does not ship in gives no row.",
        json_schema_extra={"minItems": 1, "uniqueItems": True},  # _some_runtime
    )
    batch_sizes: list[int] = Field(
        [1, 64],
        description="Batch sizes whose latency is timed, each once.",
        json_schema_extra={  # _batches
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "integer", "minimum": 1, "maximum": 65536},
        },
    )
    threads: int | Literal["all"] = Field(
        1,
        description="Intra-op threads of every runtime, or all (every core).",
        json_schema_extra={"minimum": 1, "maximum": 1024},  # _threads
    )
    warmup: int = Field(10, ge=1, le=100_000, description="Untimed calls before timing starts.")
    repeats: int = Field(50, ge=5, le=1_000_000, description="Fewest timed calls per measurement.")
    min_seconds: float = Field(
        1.0, ge=0, le=3600, description="Seconds of timing per measurement, at least (with repeats)."
    )
    max_seconds: float = Field(
        20.0, gt=0, le=3600, description="Seconds of timing per measurement, at most; >= min_seconds."
    )
    baseline: str = Field("baseline", description="The reference variant for deltas (same runtime).")
    eval_batch_size: int = Field(1000, gt=0, le=65536, description="Batch size of the accuracy pass.")

    @field_validator("runtimes")
    @classmethod
    def _some_runtime(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("list each runtime once, at least one of: " + ", ".join(RUNTIMES))
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value) or any(b < 1 or b > 65536 for b in value):
            raise ValueError("batch_sizes must be distinct sizes between 1 and 65536, e.g. [1, 64]")
        return sorted(value)

    @field_validator("threads")
    @classmethod
    def _threads(cls, value: int | str) -> int | str:
        if value != "all" and not 1 <= int(value) <= 1024:
            raise ValueError("threads must be a positive number of threads or 'all'")
        return value

    @model_validator(mode="after")
    def _times(self) -> BenchmarkConfig:
        if self.max_seconds < self.min_seconds:
            raise ValueError(f"max_seconds ({self.max_seconds}) must be >= min_seconds ({self.min_seconds})")
        return self

    def consumes(self, available: list[str]) -> list[str]:
        names = list(self.from_) if self.from_ is not None else list(available)
        if not names:
            raise ValueError("from: no earlier stage produces a variant to benchmark")
        if "baseline" in self.model_fields_set and self.baseline not in names:
            raise ValueError(
                f"baseline: variant {self.baseline!r} is not among the benchmarked variants "
                f"({', '.join(names)}); name one of them"
            )
        return names


@stage("benchmark", BenchmarkConfig, version=4)  # 4: the table is a declared output
def run(cfg: BenchmarkConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = ctx.data()
    test = bundle.test
    labels = test.y.numpy()
    threads = measure.resolve_threads(cfg.threads)
    first = bundle.normalize(test.x[: max(cfg.batch_sizes)]).float().contiguous()
    timing_inputs = {b: measure.fixed_inputs(first, b) for b in cfg.batch_sizes}
    env = {
        "threads": threads,
        "cpu_model": measure.cpu_model(),
        "torch_version": torch.__version__,
        "onnxruntime_version": package_version("onnxruntime"),
    }
    ctx.log.info(
        "benchmark: %d variants x %s, batch sizes %s, %d thread(s), %d test images",
        len(inputs),
        ", ".join(cfg.runtimes),
        cfg.batch_sizes,
        threads,
        len(labels),
    )
    rows = _Rows(cfg, ctx, bundle, threads)
    with measure.torch_threads(threads):
        for variant in inputs:
            try:
                counts = _counts(variant, ctx, first[:1])
            except Exception as exc:  # counts are one column group; the timings still matter
                ctx.log.exception("benchmark: cannot count parameters/MACs of %s", variant.name)
                counts = {"counts_from": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
            exports = export_report(ctx.artifacts.get(variant.name, {}))
            for runtime in cfg.runtimes:
                target = target_of(variant, runtime, ctx, exports)
                if target is not None:
                    rows.measure(variant, runtime, target, {**counts, **env})
        _time_all(cfg, rows.timed, timing_inputs)
        for row, _ in rows.timed:
            ctx.log.info("benchmark: %s", _summary_line(row, cfg.batch_sizes))
    store = rows.store
    rows = rows.rows

    paired_started = time.perf_counter()  # vs the baseline, same runtime; every row's predictions
    paired.add_table_columns(rows, store, cfg.baseline)

    import pandas as pd  # here, not at the top: every CLI run imports the stages (0.5 s)

    frame = _with_deltas(pd.DataFrame(rows), cfg).reindex(columns=columns(cfg.batch_sizes))
    table = ResultsTable(frame.to_dict(orient="records"), list(frame.columns), store)
    publish = table.save(out_dir)
    ctx.log.info(
        "benchmark: paired columns, %s in %.3f s", PREDICTIONS_FILE, time.perf_counter() - paired_started
    )
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "rows": len(table.rows),
        "failed_rows": sum(row["status"] != "ok" for row in table.rows),
        "threads": threads,
        "cpu_model": env["cpu_model"],
        "batch_sizes": cfg.batch_sizes,
        "baseline": cfg.baseline,
        "test_images": int(len(labels)),
        "seconds": round(seconds, 2),
    }
    for row in table.rows:
        metrics[f"{row['variant']}@{row['runtime']}"] = _summary_line(row, cfg.batch_sizes)
    write_json(out_dir / "summary.json", metrics)
    return StageResult(metrics=metrics, publish=publish, table=out_dir / RESULTS_JSON)


class _Rows:
    """The table as it is measured: one row per (variant, runtime), each ok row's predictions
    (``store``, for the paired columns and predictions.npz) and what is still to be timed."""

    def __init__(self, cfg: BenchmarkConfig, ctx: Context, bundle: Any, threads: int) -> None:
        self.cfg, self.ctx, self.bundle, self.threads = cfg, ctx, bundle, threads
        self.labels = bundle.test.y.numpy()
        self.rows: list[dict[str, Any]] = []
        self.store = Predictions(
            self.labels, list(bundle.classes), str(getattr(bundle, "fingerprint", "") or "")
        )
        self.timed: list[tuple[dict[str, Any], Callable[[torch.Tensor], np.ndarray]]] = []
        self._pytorch: dict[str, np.ndarray] = {}  # eager predictions, the agreement's reference

    def measure(self, variant: Variant, runtime: str, target: dict[str, Any], shared: dict[str, Any]) -> None:
        """Accuracy, agreement and file sizes of one row (timing comes later, interleaved)."""
        row: dict[str, Any] = {
            "variant": variant.name,
            "runtime": runtime,
            "format": variant.format if runtime == "pytorch" else FILE_FORMAT[runtime],
            "parent": variant.parent,
            "stage": variant.stage,
            "is_baseline": variant.name == self.cfg.baseline,
            **shared,
            **target["export"],
        }
        self.rows.append(row)
        if target["path"] is None:
            row.update(status="export_failed", error=target["error"])
            return
        path = Path(target["path"])
        row["file"] = _shown(path, self.ctx)
        try:
            predict = runner_for(runtime, variant, path, self.threads)
            row.update(_accuracy(self.cfg, predict, self.bundle, self.labels))
        except Exception as exc:  # one runtime failing must not hide the other rows
            self.ctx.log.exception("benchmark: %s in %s failed", variant.name, runtime)
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            return
        predictions = row.pop("_predictions")
        self.store.add(variant.name, runtime, predictions)
        own = variant.format == "torch"
        if runtime == "pytorch" and own:
            self._pytorch[variant.name] = predictions
        # fp32 files are compared with their own eager model; int8/ONNX-only ones with the parent's
        reference = self._pytorch.get(variant.name if own else (variant.parent or ""))
        if reference is not None:
            row["top1_agreement_pytorch"] = float(np.mean(predictions == reference))
        files = [path.with_name(n) for n in target["files"]] or [path]
        row.update(status="ok", error=None, size_bytes=sum(measure.file_size(f) for f in files))
        row["gzip_bytes"] = sum(measure.gzip_size(f) for f in files)
        row["runtime_version"] = runtime_version(runtime)
        self.timed.append((row, predict))


# ---------------------------------------------------------------- what to measure


def _accuracy(
    cfg: BenchmarkConfig,
    predict: Callable[[torch.Tensor], np.ndarray],
    bundle: Any,
    labels: np.ndarray,
) -> dict[str, Any]:
    """Top-1 and per-class accuracy over the test split, normalised one batch at a time."""
    step, test = cfg.eval_batch_size, bundle.test
    predictions = np.concatenate(
        [predict(bundle.normalize(test.x[i : i + step]).float()).argmax(1) for i in range(0, len(test), step)]
    )
    accuracy, correct, per_class = measure.accuracy_from_predictions(predictions, labels, bundle.classes)
    present = [v for v in per_class.values() if v is not None]
    return {
        "_predictions": predictions,
        "accuracy": accuracy,
        "correct": correct,
        "test_count": int(len(labels)),
        "per_class_accuracy": per_class,
        "per_class_min_accuracy": min(present) if present else None,
    }


def _time_all(
    cfg: BenchmarkConfig,
    timed: list[tuple[dict[str, Any], Callable[[torch.Tensor], np.ndarray]]],
    timing_inputs: dict[int, torch.Tensor],
) -> None:
    """Latency of every measured row at each batch size, all rows timed in interleaved rounds,
    so their ratios are not skewed by a change of load on a shared machine."""
    for batch, x in timing_inputs.items():
        latencies = measure.time_interleaved(
            [lambda predict=predict, x=x: predict(x) for _, predict in timed],
            batch,
            warmup=cfg.warmup,
            repeats=cfg.repeats,
            min_seconds=cfg.min_seconds,
            max_seconds=cfg.max_seconds,
        )
        for (row, _), latency in zip(timed, latencies, strict=True):
            row[f"latency_b{batch}_p50_ms"] = latency.p50_ms
            row[f"latency_b{batch}_p95_ms"] = latency.p95_ms
            row[f"latency_b{batch}_spread_pct"] = latency.spread_pct
            row[f"latency_b{batch}_repeats"] = latency.repeats
            row[f"throughput_b{batch}"] = latency.throughput


def _counts(variant: Variant, ctx: Context, sample: torch.Tensor) -> dict[str, Any]:
    """Parameters, non-zero parameters and MACs: from the torch model, else its parent's."""
    source, origin = variant, "self"
    if variant.format != "torch":
        parent = ctx.variants.get(variant.parent or "")
        usable = parent is not None and parent.format == "torch"
        source, origin = (parent, f"parent:{parent.name}") if usable else (None, "")
    if source is not None:
        model, _ = source.load_torch()
        macs = measure.count_macs(model, sample)
        params = measure.count_parameters(model)
        nonzero = measure.count_nonzero_parameters(model)
        return {
            "parameters": params,
            "nonzero_parameters": nonzero,
            "sparsity": 1 - nonzero / params if params else None,
            "macs": macs.macs,
            "nonzero_macs": macs.nonzero_macs,
            "counts_from": origin,
        }
    path = ctx.artifacts.get(variant.name, {}).get("onnx", variant.file if variant.format == "onnx" else None)
    if path is None:
        empty = ("parameters", "nonzero_parameters", "sparsity", "macs", "nonzero_macs")
        return {**dict.fromkeys(empty), "counts_from": "unknown (no torch model, parent or ONNX file)"}
    params, nonzero = measure.onnx_initializer_counts(Path(path))
    return {
        "parameters": params,
        "nonzero_parameters": nonzero,
        "sparsity": 1 - nonzero / params if params else None,
        "macs": None,
        "nonzero_macs": None,
        "counts_from": "onnx-initializers",
    }


def _with_deltas(frame: pd.DataFrame, cfg: BenchmarkConfig) -> pd.DataFrame:
    """accuracy (pp), size, gzip, parameter, MAC and latency ratios vs the baseline, same runtime."""
    if frame.empty:
        return frame
    pairs = [("size_ratio", "size_bytes"), ("gzip_ratio", "gzip_bytes"), ("parameters_ratio", "parameters")]
    pairs += [("macs_ratio", "macs")]
    pairs += [(f"latency_ratio_b{b}", f"latency_b{b}_p50_ms") for b in cfg.batch_sizes]
    for column in {"accuracy_delta_pp", *(name for name, _ in pairs)}:
        frame[column] = np.nan
    for _runtime, group in frame.groupby("runtime"):
        base = group[(group["variant"] == cfg.baseline) & (group["status"] == "ok")]
        if base.empty:
            continue
        ref = base.iloc[0]
        index = group.index
        frame.loc[index, "accuracy_delta_pp"] = 100 * (group["accuracy"] - ref["accuracy"])
        for name, source in pairs:
            if source in frame and _number(ref.get(source)):
                frame.loc[index, name] = group[source].astype(float) / float(ref[source])
    return frame


# ---------------------------------------------------------------- small helpers


def _number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not math.isnan(value) and value != 0


def _shown(path: Path, ctx: Context) -> str:
    """The file relative to artifacts/<pipeline>/ when it is inside it (stable across machines)."""
    try:
        return Path(path).resolve().relative_to(ctx.run_dir.parent.resolve()).as_posix()
    except ValueError:
        return str(path)


def _summary_line(row: dict[str, Any], batch_sizes: list[int]) -> str:
    if row.get("status") != "ok":
        return f"{row['variant']} [{row['runtime']}]: {row.get('status')}: {row.get('error')}"
    parts = [f"{row['variant']} [{row['runtime']}]: acc {100 * row['accuracy']:.2f}%"]
    delta = row.get("accuracy_delta_pp")
    if isinstance(delta, float) and not math.isnan(delta):
        parts[0] += f" ({delta:+.2f} pp)"
    for b in batch_sizes:
        parts.append(f"b{b} p50 {row[f'latency_b{b}_p50_ms']:.3f} ms")
    parts.append(f"size {row['size_bytes'] / 1024:.1f} KiB (gzip {row['gzip_bytes'] / 1024:.1f} KiB)")
    return ", ".join(parts)
