"""Stage ``export``: every variant as the files that ship, checked, and a deploy bundle.

For each torch variant: ONNX (single file, dynamic batch, input ``input``, output ``logits``,
checked with ``onnx.checker`` in full and strict shape inference) and TorchScript. ONNX-only
variants (e.g. onnxruntime-quantized models) are checked, given the same metadata and
copied. Every file is run on a fixed sample of test images and compared with its source
(parity); a file that fails to export or fails parity is recorded as failed with the reason
and the numbers, and the other variants carry on.

Layout of the stage directory::

    deploy/                    what an edge team gets (see compress/ship/bundle.py): <variant>.onnx,
                               <variant>.model.json, <variant>.expected.npy, labels.json,
                               sample_input.npy, sample_pixels.npy, sample_labels.npy,
                               bundle.json, README.md, SHA256SUMS
    torchscript/<variant>.pt   + <variant>.model.json (also stored inside the .pt archive)
    exports/<variant>.json     status and parity of each file (attached as 'export_report')
    controls/<variant>.onnx    from-scratch controls (``*.scratch``): measured, never shipped
    failed/                    files that exported but failed a check, kept for inspection
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from compress import gating
from compress.config import StageConfig
from compress.config.messages import did_you_mean
from compress.context import Context
from compress.fileio import write_json
from compress.ship.bundle import ShippedModel, TargetFiles, write_bundle
from compress.ship.convert import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME
from compress.ship.edge import ParitySettings, Shipment, ship
from compress.ship.edge import describe as describe_target
from compress.ship.targets import TARGETS, missing_packages
from compress.ship.targets.registry import install_hint
from compress.ship.targets.source import Source
from compress.ship.variant import export_variant, safe_filename
from compress.stages import stage
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


def project_version() -> str:
    try:
        return metadata.version("compress")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class _ParityImages:
    """The seeded test images every format of every variant is checked on; the first ``shown``
    of them also go into the deploy bundle as the edge team's sample."""

    pixels: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor  # normalised, what the models take
    shown: int

    @property
    def sample(self) -> np.ndarray:
        return self.images[: self.shown].numpy()


@dataclass
class _Exports:
    """What exporting every input gave: per variant its report and files, the ONNX models the
    bundle ships and what the edge targets convert from."""

    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Path]] = field(default_factory=dict)
    shipped: list[ShippedModel] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)


@stage("export", ExportConfig, version=1)
def run(cfg: ExportConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    bundle = ctx.data()
    parity = _parity_images(cfg, bundle, ctx.seed)
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
    exports = _export_all(cfg, inputs, ctx, out_dir, parity, common)
    shipment = _ship_targets(cfg, exports.sources, parity.images.numpy(), ctx, out_dir)
    for name, entries in shipment.entries.items():
        exports.reports[name]["targets"] = entries
    for name, files_by_target in shipment.files.items():
        exports.artifacts[name].update({target: files[0] for target, files in files_by_target.items()})
    for name, report in exports.reports.items():
        report_path = out_dir / "exports" / f"{safe_filename(name)}.json"
        write_json(report_path, report)
        exports.artifacts[name]["export_report"] = report_path
    accuracies = {v.name: v.metrics.get("test_accuracy") for v in inputs}
    _write_bundle(out_dir / "deploy", exports, shipment, parity, bundle, common, accuracies)
    write_json(out_dir / "export.json", exports.reports)
    shutil.rmtree(out_dir / "work", ignore_errors=True)
    metrics = _metrics(cfg, exports, shipment, len(parity.images))
    return StageResult(metrics=metrics, artifacts=exports.artifacts)


def _parity_images(cfg: ExportConfig, bundle: Any, seed: int) -> _ParityImages:
    test = bundle.test
    count = min(cfg.parity_samples, len(test))
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:count]
    pixels = test.x[order]
    images = bundle.normalize(pixels).float().contiguous()
    return _ParityImages(pixels, test.y[order], images, min(cfg.sample_count, count))


def _export_all(
    cfg: ExportConfig,
    inputs: list[Variant],
    ctx: Context,
    out_dir: Path,
    parity: _ParityImages,
    common: dict[str, Any],
) -> _Exports:
    """Every input to every format, each logged; a variant that fails does not stop the others."""
    exports = _Exports()
    for variant in inputs:
        facts = {
            **common,
            "variant": variant.name,
            "stage": variant.stage,
            "parent": variant.parent,
            "source_format": variant.format,
            "test_accuracy": variant.metrics.get("test_accuracy"),
        }
        report, files, model, source = export_variant(
            cfg, variant, ctx, out_dir, parity.images, parity.sample, facts
        )
        exports.reports[variant.name] = report
        exports.artifacts[variant.name] = files
        if model is not None:
            exports.shipped.append(model)
        if source is not None and gating.shipped(variant.name):
            exports.sources.append(source)
        if report.get("skipped"):
            ctx.log.info("export: %s: skipped: %s", variant.name, report["skipped"])
        for fmt, entry in report["files"].items():
            level = ctx.log.info if entry["ok"] else ctx.log.error
            level("export: %s %s: %s", variant.name, fmt, _describe(entry))
    return exports


def _write_bundle(
    deploy_dir: Path,
    exports: _Exports,
    shipment: Shipment,
    parity: _ParityImages,
    bundle: Any,
    common: dict[str, Any],
    accuracies: dict[str, Any],
) -> None:
    """The deploy folder: the shipped ONNX models, the target files, the sample and its answers."""
    shown = parity.shown
    write_bundle(
        deploy_dir,
        exports.shipped,
        pixels=parity.pixels[:shown].numpy(),
        images=parity.sample,
        labels=parity.labels[:shown].numpy(),
        classes=list(bundle.classes),
        facts={k: common[k] for k in ("pipeline", "run_id", "compress_version", "preprocessing")},
        targets=[
            TargetFiles(
                variant=source.variant,
                target=target,
                files=shipment.files[source.variant][target],
                expected=source.reference[:shown],
                parity=shipment.entries[source.variant][target],
                test_accuracy=accuracies[source.variant],
            )
            for source in exports.sources
            for target in shipment.files.get(source.variant, {})
        ],
        bundle_files=shipment.bundle_files,
    )


def _metrics(cfg: ExportConfig, exports: _Exports, shipment: Shipment, count: int) -> dict[str, Any]:
    """The stage's metrics: counts, what shipped where, and one line per file and target."""
    reports = exports.reports
    entries = [(name, fmt, e) for name, r in reports.items() for fmt, e in r["files"].items()]
    metrics: dict[str, Any] = {
        "exported": sum(e["ok"] for _, _, e in entries),
        "failed": sum(not e["ok"] for _, _, e in entries),
        "shipped_onnx": [m.variant for m in exports.shipped],
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
    metrics["shipped"]["onnx"] = [m.variant for m in exports.shipped]
    for name, report in reports.items():
        if report.get("skipped"):
            metrics[name] = f"skipped: {report['skipped']}"
    return metrics


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


# ---------------------------------------------------------------- the parent, the bundle
