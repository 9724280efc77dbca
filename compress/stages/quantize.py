"""Stage ``quantize``: int8 variants of earlier variants, in onnxruntime or PyTorch (torchao).

Per parent ``P`` and mode it adds ``P.int8-dynamic`` / ``P.int8-static`` (onnxruntime, the
files edge teams receive) or ``P.pt-int8-dynamic`` / ``P.pt-int8-static`` (PyTorch, always
with the ``pt-`` prefix so both backends can quantize the same parent in one pipeline;
``suffix:`` overrides the middle part). Calibration uses training images only. A static
variant that loses more than ``tolerance`` pp on the validation split gets its most
sensitive layers kept in fp32; with ``prefer: latency`` the onnxruntime backend also leaves
in fp32 whatever measurably makes the int8 model slower. Every try is written to
``quantize.json`` (published as ``reports/<pipeline>/<stage name>.json``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress import quantization as q
from compress.config import StageConfig, StrictModel
from compress.context import Context
from compress.data import DataBundle, calibration_images
from compress.errors import ArtifactError
from compress.fileio import write_json
from compress.measure import count_parameters
from compress.stages import stage
from compress.variants import StageResult, Variant

ORT_ONLY = ("per_channel", "activation_type", "weight_type", "op_types")


class CalibrationConfig(StrictModel):
    images: int = Field(1024, gt=0, le=1_000_000)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(99.999, gt=50, le=100)
    batch_size: int = Field(64, gt=0, le=65536)

    @model_validator(mode="after")
    def _percentile_needs_method(self) -> CalibrationConfig:
        if "percentile" in self.model_fields_set and self.method != "percentile":
            raise ValueError("percentile applies only with method: percentile")
        return self


class LatencyConfig(StrictModel):
    batch_size: int = Field(64, gt=0, le=65536)
    threads: int = Field(1, ge=1, le=256)
    rounds: int = Field(15, ge=1, le=1000)
    runs: int = Field(3, ge=1, le=1000)
    margin: float = Field(0.05, ge=0, lt=1)


class QuantizeConfig(StageConfig):
    stage: Literal["quantize"]
    tunable: ClassVar[bool] = True
    backend: Literal["onnxruntime", "pytorch"] = "onnxruntime"
    modes: list[Literal["dynamic", "static"]] = Field(
        default_factory=lambda: ["dynamic", "static"], min_length=1
    )
    calibration: CalibrationConfig = CalibrationConfig()
    per_channel: bool = False
    reduce_range: bool = False
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm"], min_length=1)
    tolerance: float | None = Field(0.5, ge=0, le=100)
    prefer: Literal["accuracy", "latency"] = "accuracy"
    latency: LatencyConfig = LatencyConfig()
    suffix: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

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
        if self.backend == "pytorch":
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
        return f"{parent}.{self.tag}-{mode}"

    def ort_settings(self) -> q.OrtSettings:
        return q.OrtSettings(
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
            activation_type=self.activation_type,
            weight_type=self.weight_type,
            dynamic_op_types=list(self.op_types),
            calibration_method=self.calibration.method,
            percentile=self.calibration.percentile,
            calibration_batch=self.calibration.batch_size,
        )


@dataclass
class Job:
    """What every mode of one parent shares."""

    cfg: QuantizeConfig
    parent: Variant
    model: nn.Module
    bundle: DataBundle
    images: torch.Tensor
    sample: torch.Tensor  # the latency batch
    ctx: Context
    out_dir: Path


@stage("quantize", QuantizeConfig, version=1)
def run(cfg: QuantizeConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    for parent in inputs:
        if parent.format != "torch":
            raise ArtifactError(
                f"stage {cfg.label!r}: variant {parent.name!r} is a {parent.format} file; quantize "
                "takes PyTorch variants (e.g. baseline, pruned, student), not already-exported ones"
            )
    bundle = ctx.data()
    count = min(cfg.calibration.images, len(bundle.train))
    images = calibration_images(bundle, count, seed=ctx.seed)
    reps = -(-cfg.latency.batch_size // len(images))
    sample = images.repeat(reps, 1, 1, 1)[: cfg.latency.batch_size].contiguous()
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
    for parent in inputs:
        model, _ = parent.load_torch()
        model.eval()
        job = Job(cfg, parent, model, bundle, images, sample, ctx, out_dir)
        runner = _onnxruntime if cfg.backend == "onnxruntime" else _pytorch
        for variant, record in runner(job):
            report["variants"][record["name"]] = record
            if variant is not None:
                variants.append(variant)
            else:
                problems[record["name"]] = record.get("save_error", "not saved")
    shutil.rmtree(out_dir / "work", ignore_errors=True)
    write_json(out_dir / "quantize.json", report)
    metrics = {
        "backend": cfg.backend,
        "calibration_images": count,
        "variants": {name: _brief(r["metrics"]) for name, r in report["variants"].items()},
    }
    if problems:
        metrics["not_saved"] = problems
        ctx.log.warning("quantize: evaluated but could not save: %s", problems)
    return StageResult(variants=variants, metrics=metrics, publish={"quantize.json": f"{cfg.label}.json"})


# ------------------------------------------------------------------ onnxruntime


def _onnxruntime(job: Job) -> list[tuple[Variant | None, dict[str, Any]]]:
    from onnxruntime.quantization.registry import QDQRegistry

    cfg, bundle, log = job.cfg, job.bundle, job.ctx.log
    settings = cfg.ort_settings()
    pdir = job.out_dir / job.parent.name
    fp32, pre = pdir / "fp32.onnx", pdir / "fp32-pre.onnx"
    meta = {"compress.variant": job.parent.name, "preprocessing": json.dumps(bundle.preprocessing())}
    q.prepare_onnx(job.model, job.sample[:2], fp32, pre, meta)
    has_val = len(bundle.val) > 0
    parent_val = q.onnx_accuracy(fp32, bundle, bundle.val)["accuracy"] if has_val else None
    parent_test = _test_accuracy(job, lambda split: q.onnx_accuracy(fp32, bundle, split))
    fp32_sizes = q.file_sizes(fp32)
    nodes = q.graph_nodes(pre)
    threads = cfg.latency.threads
    fp32_runner = q.onnx_runner(fp32, job.sample, threads)
    results = []
    for mode in cfg.modes:
        name = cfg.output_name(job.parent.name, mode)
        work = job.out_dir / "work" / name
        work.mkdir(parents=True, exist_ok=True)
        counter = iter(range(1_000_000))
        if mode == "dynamic":
            weight_nodes = [n for n, t in nodes if t in settings.dynamic_op_types]
            quantizable = weight_nodes

            def make(excluded: list[str], path: Path) -> Path:
                return q.quantize_onnx_dynamic(pre, path, settings, excluded)

        else:
            weight_nodes = [n for n, t in nodes if t in q.WEIGHT_OP_TYPES]
            quantizable = [n for n, t in nodes if t in QDQRegistry]
            reader = q.ImageReader(job.images, cfg.calibration.batch_size)
            cache = work / "calibration.json"

            def make(excluded: list[str], path: Path, reader=reader, cache=cache) -> Path:
                return q.quantize_onnx_static(pre, path, reader, settings, excluded, cache)

        def val_accuracy(excluded: list[str], make=make, work=work, counter=counter) -> float:
            path = make(excluded, work / f"try-{next(counter)}.onnx")
            try:
                return q.onnx_accuracy(path, bundle, bundle.val)["accuracy"]
            finally:
                path.unlink(missing_ok=True)

        excluded, tries, sensitivity = _accuracy_step(
            cfg, mode, weight_nodes, val_accuracy, parent_val, has_val
        )
        search: list[dict[str, Any]] = []
        if cfg.prefer == "latency":
            types = {t for n, t in nodes if n in quantizable}
            groups = {t: [n for n, tt in nodes if tt == t and n in quantizable] for t in sorted(types)}

            def build(ex: list[str], make=make, work=work, counter=counter) -> Callable[[], Any]:
                path = make(ex, work / f"try-{next(counter)}.onnx")
                runner = q.onnx_runner(path, job.sample, threads)
                path.unlink(missing_ok=True)
                return runner

            def accept(ex: list[str], val_accuracy=val_accuracy) -> bool:
                return not has_val or q.meets(parent_val, val_accuracy(ex), cfg.tolerance)

            excluded, search = q.latency_search(
                excluded,
                groups,
                weight_nodes,
                build,
                fp32_runner,
                accept,
                margin=cfg.latency.margin,
                rounds=cfg.latency.rounds,
                runs=cfg.latency.runs,
            )
            log.info("quantize: %s after the latency search keeps in fp32: %s", name, excluded or "nothing")
        final = make(excluded, job.out_dir / f"{name}.onnx")
        val = q.onnx_accuracy(final, bundle, bundle.val)["accuracy"] if has_val else None
        test = _test_accuracy(job, lambda split, final=final: q.onnx_accuracy(final, bundle, split))
        fp32_ms, int8_ms = q.compare_latency(
            [fp32_runner, q.onnx_runner(final, job.sample, threads)],
            rounds=cfg.latency.rounds,
            runs=cfg.latency.runs,
        )
        sizes = q.file_sizes(final)
        path_used = (
            f"onnxruntime quantize_dynamic({'/'.join(settings.dynamic_op_types)}, "
            f"weights {settings.weight_type})"
            if mode == "dynamic"
            else f"onnxruntime quantize_static(QDQ, {settings.activation_type} activations, "
            f"{settings.weight_type} weights, {settings.calibration_method} calibration)"
        )
        metrics = _metrics(
            job,
            mode,
            val,
            test,
            parent_val,
            parent_test,
            sizes,
            fp32_sizes,
            fp32_ms,
            int8_ms,
            excluded,
            weight_nodes,
        )
        metrics.update(q.int8_initializers(final))
        metrics["runtime"] = "onnxruntime"
        metrics["parent_runtime_accuracy_note"] = "parent accuracy measured on its fp32 ONNX in onnxruntime"
        _log_variant(log, name, metrics)
        record = {
            "name": name,
            "parent": job.parent.name,
            "mode": mode,
            "path": path_used,
            "metrics": metrics,
            "accuracy_tries": [t.to_json() for t in tries],
            "sensitivity": sensitivity,
            "latency_search": search,
            "settings": {
                **{k: v for k, v in vars(settings).items()},
                "calibration_images": len(job.images) if mode == "static" else 0,
                "nodes_to_exclude": excluded,
            },
        }
        variant = Variant(
            name=name,
            format="onnx",
            file=final,
            stage=cfg.label,
            parent=job.parent.name,
            metrics=metrics,
            info={
                "backend": "onnxruntime",
                "mode": mode,
                "path": path_used,
                "fp32_onnx": str(fp32.relative_to(job.out_dir)),
                "fp32_layers": excluded,
                "preprocessing": bundle.preprocessing(),
            },
        )
        results.append((variant, record))
    return results


def _accuracy_step(
    cfg: QuantizeConfig,
    mode: str,
    candidates: list[str],
    val_accuracy: Callable[[list[str]], float],
    parent_val: float | None,
    has_val: bool,
) -> tuple[list[str], list[q.Try], list[dict[str, Any]]]:
    """The accuracy-aware fallback for static variants; a single measured try otherwise."""
    if not has_val:
        return [], [], []
    if mode == "static" and cfg.tolerance is not None:
        return q.accuracy_fallback(candidates, val_accuracy, parent_val, cfg.tolerance)
    acc = val_accuracy([])
    ok = q.meets(parent_val, acc, cfg.tolerance)
    note = "dynamic: no fallback" if mode == "dynamic" else "tolerance: null"
    return [], [q.Try([], acc, q.drop_pp(parent_val, acc), ok, note)], []


# ------------------------------------------------------------------ PyTorch


def _pytorch(job: Job) -> list[tuple[Variant | None, dict[str, Any]]]:
    cfg, bundle, log = job.cfg, job.bundle, job.ctx.log
    model, sample2 = job.model.cpu().eval(), job.sample[:2]
    has_val = len(bundle.val) > 0
    fp32_predict = q.torch_predictor(model)
    parent_val = q.accuracy_of(fp32_predict, bundle, bundle.val)["accuracy"] if has_val else None
    parent_test = _test_accuracy(job, lambda split: q.accuracy_of(fp32_predict, bundle, split))
    pdir = job.out_dir / job.parent.name
    try:
        q.save_exported(model, sample2, pdir / "fp32.pt2")
        fp32_sizes = q.file_sizes(pdir / "fp32.pt2")
    except Exception as exc:  # size of the parent in the same format is a nice-to-have
        log.warning("quantize: cannot save %s as an exported program (%s)", job.parent.name, exc)
        fp32_sizes = q.file_sizes(job.parent.file)
    weight_modules = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    results = []
    for mode in cfg.modes:
        name = cfg.output_name(job.parent.name, mode)
        tries: list[q.Try] = []
        sensitivity: list[dict[str, Any]] = []
        excluded: list[str] = []
        if mode == "static":

            def val_accuracy(ex: list[str]) -> float:
                quantized = q.pt2e_static(
                    model, sample2, job.images, ex, cfg.reduce_range, cfg.calibration.batch_size
                )
                return q.accuracy_of(q.torch_predictor(quantized), bundle, bundle.val)["accuracy"]

            excluded, tries, sensitivity = _accuracy_step(
                cfg, mode, weight_modules, val_accuracy, parent_val, has_val
            )
            quantized = q.pt2e_static(
                model, sample2, job.images, excluded, cfg.reduce_range, cfg.calibration.batch_size
            )
            path_used = (
                "torchao PT2E: torch.export + prepare_pt2e/convert_pt2e, X86InductorQuantizer (static)"
            )
        else:
            quantized, path_used = q.torchao_dynamic(model, sample2)
            if has_val:
                acc = q.accuracy_of(q.torch_predictor(quantized), bundle, bundle.val)["accuracy"]
                ok = q.meets(parent_val, acc, cfg.tolerance)
                tries = [q.Try([], acc, q.drop_pp(parent_val, acc), ok, "dynamic: no fallback")]
        file = job.out_dir / f"{name}.pt2"
        save_error = None
        try:
            shipped = q.save_exported(quantized, sample2, file)
        except Exception as exc:  # recorded in the metrics: the run goes on without this file
            first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            save_error = f"{type(exc).__name__}: {first_line}"
            log.warning("quantize: %s cannot be saved as an exported program: %s", name, save_error)
            file.unlink(missing_ok=True)
            shipped = quantized
        predict = q.torch_predictor(shipped)
        val = q.accuracy_of(predict, bundle, bundle.val)["accuracy"] if has_val else None
        test = _test_accuracy(job, lambda split, predict=predict: q.accuracy_of(predict, bundle, split))
        with q.torch_threads(cfg.latency.threads):
            fp32_ms, int8_ms = q.compare_latency(
                [q.torch_runner(model, job.sample), q.torch_runner(shipped, job.sample)],
                rounds=cfg.latency.rounds,
                runs=cfg.latency.runs,
            )
        sizes = q.file_sizes(file) if save_error is None else {"bytes": None, "gzip_bytes": None}
        metrics = _metrics(
            job,
            mode,
            val,
            test,
            parent_val,
            parent_test,
            sizes,
            fp32_sizes,
            fp32_ms,
            int8_ms,
            excluded,
            weight_modules,
        )
        metrics["runtime"] = "pytorch eager (torch.export program)"
        metrics["saved"] = save_error is None
        if save_error:
            metrics["save_error"] = save_error
        _log_variant(log, name, metrics)
        record = {
            "name": name,
            "parent": job.parent.name,
            "mode": mode,
            "path": path_used,
            "metrics": metrics,
            "accuracy_tries": [t.to_json() for t in tries],
            "sensitivity": sensitivity,
            "latency_search": [],
        }
        if save_error:
            record["save_error"] = save_error
        variant = None
        if save_error is None:
            variant = Variant(
                name=name,
                format="pt2",
                file=file,
                stage=cfg.label,
                parent=job.parent.name,
                metrics=metrics,
                info={
                    "backend": "pytorch",
                    "mode": mode,
                    "path": path_used,
                    "fp32_layers": excluded,
                    "load": "torch.export.load(file).module()",
                    "preprocessing": bundle.preprocessing(),
                },
            )
        results.append((variant, record))
    return results


# ------------------------------------------------------------------ shared


def _test_accuracy(job: Job, accuracy: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """The test split's accuracy, or Nones inside a tuning trial, where that split is off limits."""
    if job.ctx.tuning:
        return {"accuracy": None, "correct": None, "count": None}
    return accuracy(job.bundle.test)


def _metrics(
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
            q.meets(parent_val, val, cfg.tolerance) if val is not None and parent_val is not None else None
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


def _calibration_method(cfg: QuantizeConfig) -> str:
    return cfg.calibration.method if cfg.backend == "onnxruntime" else "histogram (torchao X86 default)"


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


def _log_variant(log: Any, name: str, m: dict[str, Any]) -> None:
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
