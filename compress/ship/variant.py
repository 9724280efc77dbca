"""One variant exported to every format the export stage asks for, each file checked.

A torch variant is traced to ONNX and TorchScript and compared with its eager model; an
ONNX-only variant (int8, fp16) gets our metadata and is compared with its own file. Nothing
here raises for a problem with one variant: it comes back in the variant's report, and the
stage goes on with the others. The stage (``compress/stages/export.py``) gathers the reports,
ships the edge targets and writes the deploy bundle.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from compress import gating
from compress.context import Context
from compress.ship.bundle import ShippedModel, is_fp16, is_quantized, model_json_path
from compress.ship.convert import export_onnx
from compress.ship.files import (
    Failure,
    ParityConfig,
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
from compress.ship.targets.source import Source
from compress.variants import Variant


class ExportSettings(ParityConfig, Protocol):
    """What a variant's export reads from the export stage's settings."""

    formats: list[str]
    opset: int


def safe_filename(name: str) -> str:
    """A variant name as a file name: letters, digits, '.', '_', '-' kept, anything else '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cleaned or "model"


_Exported = tuple[dict[str, Any], dict[str, Path], ShippedModel | None, Source | None]


def export_variant(
    cfg: ExportSettings,
    variant: Variant,
    ctx: Context,
    out_dir: Path,
    images: torch.Tensor,
    sample: np.ndarray,
    facts: dict[str, Any],
) -> _Exported:
    """Export one variant to every format; never raises for a problem with this variant.

    Returns its report, its files, the ONNX it ships (if any) and, for the edge targets, what
    they convert from, carrying the source model's logits on ``images`` (the parity reference).
    """
    job = _VariantExport(cfg, variant, ctx, out_dir, images, sample, facts)
    if variant.format not in ("torch", "onnx"):
        job.report["skipped"] = (
            f"{variant.format} variants ship as their own file and are not exported to ONNX/TorchScript"
        )
        return job.report, {}, None, None
    return job.from_onnx() if variant.format == "onnx" else job.from_torch()


@dataclass
class _VariantExport:
    """One variant's export: its settings, the parity images, and the report and files so far."""

    cfg: ExportSettings
    variant: Variant
    ctx: Context
    out_dir: Path
    images: torch.Tensor
    sample: np.ndarray
    facts: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.report = {"variant": self.variant.name, "source_format": self.variant.format, "files": {}}
        self.base = safe_filename(self.variant.name)
        ships = gating.shipped(self.variant.name)  # a control's ONNX is measured but not handed over
        self.onnx_dir = self.out_dir / ("deploy" if ships else "controls")

    def from_onnx(self) -> _Exported:
        """An ONNX-only variant (int8, fp16): its file copied with our metadata and checked."""
        variant, images = self.variant, self.images
        reference = attempt(lambda: run_onnx(Path(variant.file), images.numpy(), self.cfg.threads))
        if isinstance(reference, Failure):
            self.report["files"]["onnx"] = failed(f"the source ONNX file does not run: {reference}")
            return self.report, {}, None, None
        source = lambda path: copy_with_metadata(Path(variant.file), path, self.facts)  # noqa: E731
        entry, path = make_onnx(self.cfg, self.base, self.out_dir, self.onnx_dir, reference, images, source)
        self.report["files"]["onnx"] = entry
        parent_agreement(variant, self.ctx, images, path, self.cfg, entry)
        shipped = self._keep_onnx(entry, path)
        quantized = entry["ok"] and is_quantized(path)
        half = entry["ok"] and is_fp16(path)
        onnx_path = path if entry["ok"] else None
        convertible = Source(variant.name, self.base, onnx_path, None, images, quantized, half, reference)
        return self.report, self.files, shipped, convertible

    def from_torch(self) -> _Exported:
        """A torch variant traced to ONNX and TorchScript, each checked against the eager model."""
        cfg, variant, images = self.cfg, self.variant, self.images
        try:
            model, _spec = variant.load_torch()
            model = model.eval().cpu()
            with torch.no_grad():
                reference = batched(lambda x: model(torch.from_numpy(x)).numpy(), images.numpy())
        except Exception as exc:  # a variant file we cannot even load: report, don't stop the others
            self.ctx.log.error(
                "export: %s: cannot load the torch model:\n%s", variant.name, traceback.format_exc()
            )
            for fmt in cfg.formats:
                self.report["files"][fmt] = failed(
                    f"cannot load the torch model: {type(exc).__name__}: {exc}"
                )
            return self.report, {}, None, None
        shipped = None
        trace_input = images[:2]
        if len(trace_input) < 2:  # a batch of 1 would specialise the batch dimension
            trace_input = trace_input.repeat(2, 1, 1, 1)
        if "onnx" in cfg.formats:

            def source(path: Path) -> None:
                export_onnx(model, trace_input, path, opset=cfg.opset, metadata=as_metadata(self.facts))

            entry, path = make_onnx(cfg, self.base, self.out_dir, self.onnx_dir, reference, images, source)
            self._record("onnx", entry)
            shipped = self._keep_onnx(entry, path)
        if "torchscript" in cfg.formats:
            entry, path = make_torchscript(
                cfg, self.base, self.out_dir, model, trace_input, reference, images, self.facts
            )
            self._record("torchscript", entry)
            if entry["ok"]:
                self.files["torchscript"] = path
                self.files["torchscript_json"] = path.with_suffix(".model.json")
        onnx_path = self.files.get("onnx")
        return (
            self.report,
            self.files,
            shipped,
            Source(variant.name, self.base, onnx_path, model, images, False, False, reference),
        )

    def _record(self, fmt: str, entry: dict[str, Any]) -> None:
        """The format's entry in the report; a failure's traceback goes to the log, not the report."""
        self.report["files"][fmt] = entry
        trace = entry.pop("traceback", None)
        if trace and not entry["ok"]:
            self.ctx.log.error("export: %s %s:\n%s", self.variant.name, fmt, trace)

    def _keep_onnx(self, entry: dict[str, Any], path: Path) -> ShippedModel | None:
        """A checked ONNX file joins the variant's files; a deliverable's (not a control's) ships."""
        if not entry["ok"]:
            return None
        self.files["onnx"] = path
        if not gating.shipped(self.variant.name):
            return None
        self.files["onnx_json"] = model_json_path(path)
        return shipped_model(self.variant, path, self.sample, self.cfg, entry, self.facts)


def parent_agreement(
    variant: Variant, ctx: Context, images: torch.Tensor, path: Path, cfg: ExportSettings, entry: dict
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


def shipped_model(
    variant: Variant, path: Path, sample: np.ndarray, cfg: ExportSettings, entry: dict, facts: dict
) -> ShippedModel:
    expected = run_onnx(path, sample, cfg.threads)
    quantized = is_quantized(path)
    return ShippedModel(
        variant=variant.name,
        file=path,
        expected=expected,
        metadata=facts,
        parity=entry,
        test_accuracy=variant.metrics.get("test_accuracy"),
        quantized=quantized,
        atol=cfg.parity_atol,
    )
