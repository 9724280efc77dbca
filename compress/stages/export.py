"""Stage ``export``: every variant as the files that ship, checked, and a deploy bundle.

For each torch variant: ONNX (single file, dynamic batch, input ``input``, output ``logits``,
checked with ``onnx.checker`` in full and strict shape inference) and TorchScript. ONNX-only
variants (e.g. onnxruntime-quantized models) are checked, given the same metadata and
copied. Every file is run on a fixed sample of test images and compared with its source
(parity); a file that fails to export or fails parity is recorded as failed with the reason
and the numbers, and the other variants carry on.

Layout of the stage directory::

    deploy/                    what an edge team gets (see deploy.py): <variant>.onnx,
                               <variant>.model.json, <variant>.expected.npy, labels.json,
                               sample_input.npy, sample_pixels.npy, sample_labels.npy,
                               bundle.json, README.md, SHA256SUMS
    torchscript/<variant>.pt   + <variant>.model.json (also stored inside the .pt archive)
    exports/<variant>.json     status and parity of each file (attached as 'export_report')
    controls/<variant>.onnx    from-scratch controls (``*.scratch``): measured, never shipped
    failed/                    files that exported but failed a check, kept for inspection
"""

from __future__ import annotations

import json
import os
import re
import shutil
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from pydantic import Field, field_validator

from compress import deploy, faults, gating
from compress.config import StageConfig
from compress.context import Context
from compress.exporting import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    export_onnx,
    export_torchscript,
    load_torchscript,
    set_metadata,
)
from compress.fileio import write_json
from compress.measure import ort_session
from compress.stages import stage
from compress.variants import StageResult, Variant

FORMATS = ("onnx", "torchscript")


class ExportConfig(StageConfig):
    stage: Literal["export"]
    formats: list[Literal["onnx", "torchscript"]] = ["onnx", "torchscript"]
    opset: int = Field(DEFAULT_OPSET, ge=17, le=23)
    parity_samples: int = Field(1000, gt=0, le=1_000_000)
    parity_atol: float = Field(1e-4, gt=0)
    min_top1_agreement: float = Field(1.0, ge=0, le=1)
    sample_count: int = Field(16, ge=1, le=1024)
    threads: int = Field(1, ge=1, le=256)

    @field_validator("formats")
    @classmethod
    def _some_format(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one format: onnx, torchscript")
        if len(set(value)) != len(value):
            raise ValueError("each format may be listed once")
        return value

    def consumes(self, available: list[str]) -> list[str]:
        if self.from_ is not None:
            return list(self.from_)
        if not available:
            raise ValueError("from: no earlier stage produces a variant to export")
        return list(available)


def safe_filename(name: str) -> str:
    """A variant name as a file name: letters, digits, '.', '_', '-' kept, anything else '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cleaned or "model"


def project_version() -> str:
    try:
        return metadata.version("compress")
    except metadata.PackageNotFoundError:
        return "unknown"


@stage("export", ExportConfig, version=1)
def run(cfg: ExportConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    bundle = ctx.data()
    test = bundle.test
    count = min(cfg.parity_samples, len(test))
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(ctx.seed))[:count]
    pixels = test.x[order]
    labels = test.y[order]
    images = bundle.normalize(pixels).float().contiguous()
    shown = min(cfg.sample_count, count)
    sample = images[:shown].numpy()

    deploy_dir = out_dir / "deploy"
    for sub in ("deploy", "controls", "torchscript", "exports", "failed", "work"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / sub).mkdir(parents=True)

    common = {
        "input_name": INPUT_NAME,
        "input_shape": ["batch", *bundle.input_shape],
        "input_dtype": "float32",
        "output_name": OUTPUT_NAME,
        "output_shape": ["batch", bundle.num_classes],
        "preprocessing": bundle.preprocessing(),
        "labels": list(bundle.classes),
        "pipeline": ctx.pipeline.name,
        "run_id": ctx.run_id,
        "compress_version": project_version(),
    }
    reports: dict[str, dict[str, Any]] = {}
    artifacts: dict[str, dict[str, Path]] = {}
    shipped: list[deploy.ShippedModel] = []
    for variant in inputs:
        facts = {
            **common,
            "variant": variant.name,
            "stage": variant.stage,
            "parent": variant.parent,
            "source_format": variant.format,
            "test_accuracy": variant.metrics.get("test_accuracy"),
        }
        report, files, model = _export_variant(cfg, variant, ctx, out_dir, images, sample, facts)
        reports[variant.name] = report
        report_path = out_dir / "exports" / f"{safe_filename(variant.name)}.json"
        write_json(report_path, report)
        artifacts[variant.name] = {**files, "export_report": report_path}
        if model is not None:
            shipped.append(model)
        if report.get("skipped"):
            ctx.log.info("export: %s: skipped: %s", variant.name, report["skipped"])
        for fmt, entry in report["files"].items():
            level = ctx.log.info if entry["ok"] else ctx.log.error
            level("export: %s %s: %s", variant.name, fmt, _describe(entry))

    deploy.write_bundle(
        deploy_dir,
        shipped,
        pixels=pixels[:shown].numpy(),
        images=sample,
        labels=labels[:shown].numpy(),
        classes=list(bundle.classes),
        facts={k: common[k] for k in ("pipeline", "run_id", "compress_version", "preprocessing")},
    )
    write_json(out_dir / "export.json", reports)
    shutil.rmtree(out_dir / "work", ignore_errors=True)

    entries = [(name, fmt, e) for name, r in reports.items() for fmt, e in r["files"].items()]
    metrics: dict[str, Any] = {
        "exported": sum(e["ok"] for _, _, e in entries),
        "failed": sum(not e["ok"] for _, _, e in entries),
        "shipped_onnx": [m.variant for m in shipped],
        "deploy_dir": "deploy",
        "parity_samples": count,
        "variants": reports,
    }
    for name, fmt, entry in entries:
        metrics[f"{name}.{fmt}"] = _describe(entry)
    for name, report in reports.items():
        if report.get("skipped"):
            metrics[name] = f"skipped: {report['skipped']}"
    return StageResult(metrics=metrics, artifacts=artifacts)


def _describe(entry: dict[str, Any]) -> str:
    if entry.get("max_abs_diff") is None:
        return f"FAILED: {entry.get('error')}"
    numbers = f"max|diff| {entry['max_abs_diff']:.2e}, top-1 agreement {100 * entry['top1_agreement']:.2f}%"
    return f"ok ({numbers})" if entry["ok"] else f"FAILED: {entry.get('error')} ({numbers})"


def _export_variant(
    cfg: ExportConfig,
    variant: Variant,
    ctx: Context,
    out_dir: Path,
    images: torch.Tensor,
    sample: np.ndarray,
    facts: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Path], deploy.ShippedModel | None]:
    """Export one variant to every format; never raises for a problem with this variant."""
    base = safe_filename(variant.name)
    report: dict[str, Any] = {"variant": variant.name, "source_format": variant.format, "files": {}}
    files: dict[str, Path] = {}
    shipped: deploy.ShippedModel | None = None
    ships = gating.shipped(variant.name)  # a control's ONNX is measured but not handed over
    onnx_dir = out_dir / ("deploy" if ships else "controls")

    if variant.format not in ("torch", "onnx"):
        report["skipped"] = (
            f"{variant.format} variants ship as their own file and are not exported to ONNX/TorchScript"
        )
        return report, files, None

    if variant.format == "onnx":
        reference = _try(lambda: _run_onnx(Path(variant.file), images.numpy(), cfg.threads))
        if isinstance(reference, _Failure):
            report["files"]["onnx"] = _failed(f"the source ONNX file does not run: {reference}")
            return report, files, None
        source = lambda path: _copy_with_metadata(Path(variant.file), path, facts)  # noqa: E731
        entry, path = _make_onnx(cfg, base, out_dir, onnx_dir, reference, images, source)
        report["files"]["onnx"] = entry
        _parent_agreement(variant, ctx, images, path, cfg, entry)
        if entry["ok"]:
            files["onnx"] = path
            if ships:
                files["onnx_json"] = deploy.model_json_path(path)
                shipped = _shipped(variant, path, sample, cfg, entry, facts)
        return report, files, shipped

    try:
        model, _spec = variant.load_torch()
        model = model.eval().cpu()
        with torch.no_grad():
            reference = _batched(lambda x: model(torch.from_numpy(x)).numpy(), images.numpy())
    except Exception as exc:  # a variant file we cannot even load: report, don't stop the others
        ctx.log.error("export: %s: cannot load the torch model:\n%s", variant.name, traceback.format_exc())
        for fmt in cfg.formats:
            report["files"][fmt] = _failed(f"cannot load the torch model: {type(exc).__name__}: {exc}")
        return report, files, None
    trace_input = images[:2]
    if len(trace_input) < 2:  # a batch of 1 would specialise the batch dimension
        trace_input = trace_input.repeat(2, 1, 1, 1)

    if "onnx" in cfg.formats:

        def source(path: Path) -> None:
            export_onnx(model, trace_input, path, opset=cfg.opset, metadata=_as_metadata(facts))

        entry, path = _make_onnx(cfg, base, out_dir, onnx_dir, reference, images, source)
        report["files"]["onnx"] = entry
        if entry["ok"]:
            files["onnx"] = path
            if ships:
                files["onnx_json"] = deploy.model_json_path(path)
                shipped = _shipped(variant, path, sample, cfg, entry, facts)
        elif entry.get("traceback"):
            ctx.log.error("export: %s onnx:\n%s", variant.name, entry.pop("traceback"))
        entry.pop("traceback", None)

    if "torchscript" in cfg.formats:
        entry, path = _make_torchscript(cfg, base, out_dir, model, trace_input, reference, images, facts)
        report["files"]["torchscript"] = entry
        if entry.get("traceback"):
            ctx.log.error("export: %s torchscript:\n%s", variant.name, entry["traceback"])
        entry.pop("traceback", None)
        if entry["ok"]:
            files["torchscript"] = path
            files["torchscript_json"] = path.with_suffix(".model.json")
    return report, files, shipped


# ---------------------------------------------------------------- one file per format


def _make_onnx(
    cfg: ExportConfig,
    base: str,
    out_dir: Path,
    folder: Path,
    reference: np.ndarray,
    images: torch.Tensor,
    produce: Any,
) -> tuple[dict[str, Any], Path]:
    work = out_dir / "work" / f"{base}.onnx"
    final = folder / f"{base}.onnx"
    try:
        produce(work)
    except Exception as exc:
        entry = _failed(f"ONNX export failed: {type(exc).__name__}: {_first_line(exc)}")
        entry["traceback"] = traceback.format_exc()
        return entry, final
    problem = check_onnx(work)
    if problem is not None:
        return _keep_failed(work, out_dir, _failed(problem)), final
    try:
        produced = _run_onnx(work, images.numpy(), cfg.threads)
    except Exception as exc:
        return _keep_failed(work, out_dir, _failed(f"onnxruntime cannot run it: {_first_line(exc)}")), final
    entry = _parity(reference, produced, cfg)
    entry["opset"] = _opset(work)
    if not entry["ok"]:
        return _keep_failed(work, out_dir, entry), final
    os.replace(work, final)
    faults.checkpoint(f"export:{final.name}")
    return entry, final


def _make_torchscript(
    cfg: ExportConfig,
    base: str,
    out_dir: Path,
    model: torch.nn.Module,
    trace_input: torch.Tensor,
    reference: np.ndarray,
    images: torch.Tensor,
    facts: dict[str, Any],
) -> tuple[dict[str, Any], Path]:
    final = out_dir / "torchscript" / f"{base}.pt"
    work = out_dir / "work" / f"{base}.pt"
    info = {**facts, "file": final.name, "format": "torchscript"}
    try:
        export_torchscript(model, trace_input, work, extra_files={"model.json": json.dumps(info, indent=2)})
        loaded = load_torchscript(work)
        with torch.no_grad():
            produced = _batched(lambda x: loaded(torch.from_numpy(x)).numpy(), images.numpy())
    except Exception as exc:
        entry = _failed(f"TorchScript export failed: {type(exc).__name__}: {_first_line(exc)}")
        entry["traceback"] = traceback.format_exc()
        return entry, final
    entry = _parity(reference, produced, cfg)
    if not entry["ok"]:
        return _keep_failed(work, out_dir, entry), final
    os.replace(work, final)
    write_json(final.with_suffix(".model.json"), {**info, "parity": entry})
    return entry, final


def check_onnx(path: Path) -> str | None:
    """None if the file passes the full checker, strict shape inference and our I/O contract."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path))
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:
        return f"onnx check failed: {type(exc).__name__}: {_first_line(exc)}"
    inputs = [i for i in proto.graph.input if i.name not in {x.name for x in proto.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in proto.graph.output] != [OUTPUT_NAME]:
        return (
            f"expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}, found inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in proto.graph.output]}"
        )
    first = inputs[0].type.tensor_type.shape.dim[0] if inputs[0].type.tensor_type.shape.dim else None
    if first is None or not first.dim_param:
        return "the batch dimension of the input is not dynamic"
    return None


def _parity(reference: np.ndarray, produced: np.ndarray, cfg: ExportConfig) -> dict[str, Any]:
    if reference.shape != produced.shape:
        return _failed(f"output shape {produced.shape} differs from the source's {reference.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - produced.astype(np.float64))))
    agreement = float(np.mean(reference.argmax(1) == produced.argmax(1)))
    entry: dict[str, Any] = {
        "ok": True,
        "max_abs_diff": diff,
        "top1_agreement": agreement,
        "samples": int(len(reference)),
        "atol": cfg.parity_atol,
        "error": None,
    }
    if not np.isfinite(diff) or diff > cfg.parity_atol:
        peak = float(np.max(np.abs(reference))) if reference.size else 0.0
        entry.update(
            ok=False,
            error=f"parity: max |logit diff| {diff:.3g} > {cfg.parity_atol:g} (largest |logit| {peak:.3g}, "
            f"top-1 agreement {100 * agreement:.2f}%); a deep network's float rounding in another runtime "
            "can reach ~1e-3: if the top-1 agreement is what matters, raise export.parity_atol",
        )
    elif agreement < cfg.min_top1_agreement:
        entry.update(
            ok=False,
            error=f"parity: top-1 agreement {100 * agreement:.2f}% < {100 * cfg.min_top1_agreement:.2f}%",
        )
    return entry


def _parent_agreement(
    variant: Variant, ctx: Context, images: torch.Tensor, path: Path, cfg: ExportConfig, entry: dict
) -> None:
    """For an ONNX-only variant, how far it is from the torch model it was made from (info only)."""
    parent = ctx.variants.get(variant.parent or "")
    if parent is None or parent.format != "torch" or not entry.get("ok"):
        return
    try:
        model, _ = parent.load_torch()
        with torch.no_grad():
            ref = _batched(lambda x: model.eval()(torch.from_numpy(x)).numpy(), images.numpy())
        out = _run_onnx(path, images.numpy(), cfg.threads)
    except Exception as exc:  # information only: never fails the export
        entry["parent_error"] = _first_line(exc)
        return
    entry["parent"] = parent.name
    entry["parent_max_abs_diff"] = float(np.max(np.abs(ref - out)))
    entry["parent_top1_agreement"] = float(np.mean(ref.argmax(1) == out.argmax(1)))


def _copy_with_metadata(source: Path, target: Path, facts: dict[str, Any]) -> None:
    proto = onnx.load(str(source))
    set_metadata(proto, _as_metadata(facts))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(target), save_as_external_data=False)


def _as_metadata(facts: dict[str, Any]) -> dict[str, str]:
    """metadata_props values are strings: lists and dicts as JSON, None as ''."""
    out = {}
    for key, value in facts.items():
        if value is None:
            out[key] = ""
        elif isinstance(value, str):
            out[key] = value
        else:
            out[key] = json.dumps(value)
    return out


def _shipped(
    variant: Variant, path: Path, sample: np.ndarray, cfg: ExportConfig, entry: dict, facts: dict
) -> deploy.ShippedModel:
    expected = _run_onnx(path, sample, cfg.threads)
    quantized = deploy.is_quantized(path)
    return deploy.ShippedModel(
        variant=variant.name,
        file=path,
        expected=expected,
        metadata=facts,
        parity=entry,
        test_accuracy=variant.metrics.get("test_accuracy"),
        quantized=quantized,
        atol=cfg.parity_atol,
    )


def _run_onnx(path: Path, x: np.ndarray, threads: int) -> np.ndarray:
    session = ort_session(path, threads)
    return _batched(lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0], x)


def _batched(fn: Any, x: np.ndarray, size: int = 1000) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + size]), dtype=np.float32) for i in range(0, len(x), size)])


def _opset(path: Path) -> int | None:
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _keep_failed(work: Path, out_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Keep a file that failed a check under failed/ so it can be inspected."""
    if work.exists():
        kept = out_dir / "failed" / work.name
        os.replace(work, kept)
        entry["kept_as"] = kept.relative_to(out_dir).as_posix()
    return entry


def _failed(error: str) -> dict[str, Any]:
    return {"ok": False, "max_abs_diff": None, "top1_agreement": None, "error": error}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


class _Failure(str):
    pass


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:
        return _Failure(f"{type(exc).__name__}: {_first_line(exc)}")
