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

import re
import shutil
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from compress import deploy, gating
from compress.config import StageConfig
from compress.config.messages import did_you_mean
from compress.context import Context
from compress.export_files import (
    Failure,
    as_metadata,
    attempt,
    batched,
    copy_with_metadata,
    failed,
    first_line,
    make_onnx,
    make_torchscript,
    run_onnx,
)
from compress.exporting import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx
from compress.fileio import write_json
from compress.stages import stage
from compress.targets import TARGETS, missing_packages
from compress.targets.registry import install_hint
from compress.targets.ship import ParitySettings, Shipment, ship
from compress.targets.ship import describe as describe_target
from compress.targets.source import Source
from compress.variants import StageResult, Variant

FORMATS = ("onnx", "torchscript")


class ExportConfig(StageConfig):
    """ONNX and TorchScript files plus edge targets, each checked against its source: a deploy bundle."""

    stage: Literal["export"] = Field(description="Exports variants into a checked deploy bundle.")
    formats: list[Literal["onnx", "torchscript"]] = Field(
        ["onnx", "torchscript"],
        description="Files made for torch variants, each once.",
        json_schema_extra={"minItems": 1, "uniqueItems": True},  # _some_format
    )
    opset: int = Field(DEFAULT_OPSET, ge=17, le=23, description="ONNX opset.")
    parity_samples: int = Field(
        1000, gt=0, le=1_000_000, description="Test images (a seeded sample) for the parity check."
    )
    parity_atol: float = Field(
        1e-4, gt=0, description="Largest allowed absolute logit difference from the source model (fp32)."
    )
    min_top1_agreement: float = Field(
        1.0, ge=0, le=1, description="Smallest allowed top-1 agreement with the source model, a fraction."
    )
    sample_count: int = Field(16, ge=1, le=1024, description="Images in the bundle's sample batch.")
    threads: int = Field(1, ge=1, le=256, description="onnxruntime threads for the checks.")
    targets: list[str] = Field(
        ["onnx"],
        description="Runtimes the bundle ships to, each once; onnx must be listed.",
        json_schema_extra={  # _known_targets
            "items": {"enum": list(TARGETS), "type": "string"},
            "uniqueItems": True,
            "contains": {"const": "onnx"},
        },
    )
    target_min_top1_agreement: float = Field(
        0.999,
        ge=0,
        le=1,
        description="Smallest top-1 agreement with the source model for an edge target's file, a fraction.",
    )

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in TARGETS:
                raise ValueError(
                    f"unknown target {name!r}{did_you_mean(name, TARGETS)}; known: {', '.join(TARGETS)}"
                )
        if len(set(value)) != len(value):
            raise ValueError("each target may be listed once")
        if "onnx" not in value:
            raise ValueError(
                "list onnx among the targets: the ONNX file is the bundle's reference format, "
                "the one ort and openvino are converted from (e.g. targets: [onnx, tflite])"
            )
        for name in value:
            missing = missing_packages(TARGETS[name])
            if missing:
                raise ValueError(
                    f"target {name!r} needs {', '.join(missing)}, which is not installed here: "
                    f"{install_hint(TARGETS[name])} (or leave {name} out of the targets)"
                )
        return value

    @model_validator(mode="after")
    def _onnx_for_targets(self) -> ExportConfig:
        if "onnx" not in self.formats and self.targets != ["onnx"]:
            raise ValueError("targets other than onnx are made from the ONNX file: add onnx to formats")
        return self

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
    sources: list[Source] = []
    for variant in inputs:
        facts = {
            **common,
            "variant": variant.name,
            "stage": variant.stage,
            "parent": variant.parent,
            "source_format": variant.format,
            "test_accuracy": variant.metrics.get("test_accuracy"),
        }
        report, files, model, source = _export_variant(cfg, variant, ctx, out_dir, images, sample, facts)
        reports[variant.name] = report
        artifacts[variant.name] = files
        if model is not None:
            shipped.append(model)
        if source is not None and gating.shipped(variant.name):
            sources.append(source)
        if report.get("skipped"):
            ctx.log.info("export: %s: skipped: %s", variant.name, report["skipped"])
        for fmt, entry in report["files"].items():
            level = ctx.log.info if entry["ok"] else ctx.log.error
            level("export: %s %s: %s", variant.name, fmt, _describe(entry))

    shipment = _ship_targets(cfg, sources, images.numpy(), ctx, out_dir)
    accuracies = {v.name: v.metrics.get("test_accuracy") for v in inputs}
    for name, entries in shipment.entries.items():
        reports[name]["targets"] = entries
    for name, files_by_target in shipment.files.items():
        artifacts[name].update({target: files[0] for target, files in files_by_target.items()})
    for name, report in reports.items():
        report_path = out_dir / "exports" / f"{safe_filename(name)}.json"
        write_json(report_path, report)
        artifacts[name]["export_report"] = report_path

    deploy.write_bundle(
        deploy_dir,
        shipped,
        pixels=pixels[:shown].numpy(),
        images=sample,
        labels=labels[:shown].numpy(),
        classes=list(bundle.classes),
        facts={k: common[k] for k in ("pipeline", "run_id", "compress_version", "preprocessing")},
        targets=[
            deploy.TargetFiles(
                variant=source.variant,
                target=target,
                files=shipment.files[source.variant][target],
                expected=source.reference[:shown],
                parity=shipment.entries[source.variant][target],
                test_accuracy=accuracies[source.variant],
            )
            for source in sources
            for target in shipment.files.get(source.variant, {})
        ],
        bundle_files=shipment.bundle_files,
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
    for name, entries_by_target in shipment.entries.items():
        for target, entry in entries_by_target.items():
            metrics[f"{name}.{target}"] = describe_target(entry)
    metrics["shipped"] = {
        target: [name for name, files in shipment.files.items() if target in files]
        for target in cfg.targets
        if target != "onnx"
    }
    metrics["shipped"]["onnx"] = [m.variant for m in shipped]
    for name, report in reports.items():
        if report.get("skipped"):
            metrics[name] = f"skipped: {report['skipped']}"
    return StageResult(metrics=metrics, artifacts=artifacts)


def _ship_targets(
    cfg: ExportConfig,
    sources: list[Source],
    images: np.ndarray,
    ctx: Context,
    out_dir: Path,
) -> Shipment:
    """Every shipped variant converted to every target beyond ONNX, each checked in its runtime."""
    targets = [t for t in cfg.targets if t != "onnx"]
    if not targets or not sources:
        return Shipment()
    error_log = out_dir / "error.log"

    def log(variant: str, target: str, entry: dict[str, Any], trace: str | None) -> None:
        level = ctx.log.info if entry["ok"] or entry.get("skipped") else ctx.log.error
        note = " (traceback in error.log)" if trace else ""
        level("export: %s %s: %s%s", variant, target, describe_target(entry), note)
        if trace:
            with open(error_log, "a", encoding="utf-8") as handle:
                handle.write(f"--- {variant} -> {target}\n{trace}\n")

    settings = ParitySettings(cfg.parity_atol, cfg.target_min_top1_agreement, cfg.threads)
    return ship(
        targets,
        sources,
        images,
        out_dir / "work",
        out_dir / "deploy",
        out_dir / "failed",
        settings,
        log,
    )


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
) -> tuple[dict[str, Any], dict[str, Path], deploy.ShippedModel | None, Source | None]:
    """Export one variant to every format; never raises for a problem with this variant.

    Returns its report, its files, the ONNX it ships (if any) and, for the edge targets, what
    they convert from, carrying the source model's logits on ``images`` (the parity reference).
    """
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
        return report, files, None, None

    if variant.format == "onnx":
        reference = attempt(lambda: run_onnx(Path(variant.file), images.numpy(), cfg.threads))
        if isinstance(reference, Failure):
            report["files"]["onnx"] = failed(f"the source ONNX file does not run: {reference}")
            return report, files, None, None
        source = lambda path: copy_with_metadata(Path(variant.file), path, facts)  # noqa: E731
        entry, path = make_onnx(cfg, base, out_dir, onnx_dir, reference, images, source)
        report["files"]["onnx"] = entry
        _parent_agreement(variant, ctx, images, path, cfg, entry)
        if entry["ok"]:
            files["onnx"] = path
            if ships:
                files["onnx_json"] = deploy.model_json_path(path)
                shipped = _shipped(variant, path, sample, cfg, entry, facts)
        quantized = entry["ok"] and deploy.is_quantized(path)
        half = entry["ok"] and deploy.is_fp16(path)
        onnx_path = path if entry["ok"] else None
        convertible = Source(variant.name, base, onnx_path, None, images, quantized, half, reference)
        return report, files, shipped, convertible

    try:
        model, _spec = variant.load_torch()
        model = model.eval().cpu()
        with torch.no_grad():
            reference = batched(lambda x: model(torch.from_numpy(x)).numpy(), images.numpy())
    except Exception as exc:  # a variant file we cannot even load: report, don't stop the others
        ctx.log.error("export: %s: cannot load the torch model:\n%s", variant.name, traceback.format_exc())
        for fmt in cfg.formats:
            report["files"][fmt] = failed(f"cannot load the torch model: {type(exc).__name__}: {exc}")
        return report, files, None, None
    trace_input = images[:2]
    if len(trace_input) < 2:  # a batch of 1 would specialise the batch dimension
        trace_input = trace_input.repeat(2, 1, 1, 1)

    if "onnx" in cfg.formats:

        def source(path: Path) -> None:
            export_onnx(model, trace_input, path, opset=cfg.opset, metadata=as_metadata(facts))

        entry, path = make_onnx(cfg, base, out_dir, onnx_dir, reference, images, source)
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
        entry, path = make_torchscript(cfg, base, out_dir, model, trace_input, reference, images, facts)
        report["files"]["torchscript"] = entry
        if entry.get("traceback"):
            ctx.log.error("export: %s torchscript:\n%s", variant.name, entry["traceback"])
        entry.pop("traceback", None)
        if entry["ok"]:
            files["torchscript"] = path
            files["torchscript_json"] = path.with_suffix(".model.json")
    onnx_path = files.get("onnx")
    return (
        report,
        files,
        shipped,
        Source(variant.name, base, onnx_path, model, images, False, False, reference),
    )


# ---------------------------------------------------------------- the parent, the bundle


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
            ref = batched(lambda x: model.eval()(torch.from_numpy(x)).numpy(), images.numpy())
        out = run_onnx(path, images.numpy(), cfg.threads)
    except Exception as exc:  # information only: never fails the export
        entry["parent_error"] = first_line(exc)
        return
    entry["parent"] = parent.name
    entry["parent_max_abs_diff"] = float(np.max(np.abs(ref - out)))
    entry["parent_top1_agreement"] = float(np.mean(ref.argmax(1) == out.argmax(1)))


def _shipped(
    variant: Variant, path: Path, sample: np.ndarray, cfg: ExportConfig, entry: dict, facts: dict
) -> deploy.ShippedModel:
    expected = run_onnx(path, sample, cfg.threads)
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
