"""Every exported variant converted to every edge target, each checked in its own runtime.

A file is shipped for a runtime only when that runtime, in a fresh child process that can
import nothing but numpy and the runtime (``child``), reproduces the source model's logits
on the seeded parity sample: max |diff| within the tolerance and top-1 agreement at least
``min_agreement``. A target that cannot take a variant, fails to convert or fails parity is
recorded with the reason; the other targets and variants go on.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from compress import faults
from compress.ship.targets import child
from compress.ship.targets.registry import TARGETS, Target
from compress.ship.targets.source import NotApplicable, Source

QUANTIZED_RTOL = 0.01  # of the largest |logit|: int8 kernels round differently in each runtime


@dataclass
class ParitySettings:
    atol: float
    min_agreement: float
    threads: int = 1


@dataclass
class Shipment:
    """What the targets produced: per variant, per target, a report entry and (if shipped) files."""

    entries: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, dict[str, list[Path]]] = field(default_factory=dict)
    bundle_files: list[Path] = field(default_factory=list)  # e.g. ORT's required_operators.config


def tolerance(reference: np.ndarray, quantized: bool, atol: float) -> float:
    """fp32: the configured atol; int8 and fp16: 1% of the largest |logit| (never below atol)."""
    if not quantized or not reference.size:
        return atol
    return max(atol, QUANTIZED_RTOL * float(np.max(np.abs(reference))))


def ship(
    targets: list[str],
    sources: list[Source],
    images: np.ndarray,
    work: Path,
    deploy_dir: Path,
    failed_dir: Path,
    settings: ParitySettings,
    log: Callable[[str, str, dict[str, Any], str | None], None],
) -> Shipment:
    """Convert ``sources`` to each of ``targets`` (never 'onnx': the export stage makes that).

    ``images`` is the parity sample each source's ``reference`` was computed on.
    ``log(variant, target, message, traceback)`` reports each outcome.
    """
    shipment = Shipment()
    parity_input = work / "parity_input.npy"
    np.save(parity_input, np.ascontiguousarray(images, dtype=np.float32))
    reference_files = {}
    for source in sources:
        reference_files[source.variant] = work / f"{source.base}.reference.npy"
        np.save(reference_files[source.variant], np.ascontiguousarray(source.reference, np.float32))
    for name in targets:
        target = TARGETS[name]
        folder = work / f"target-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        converted, bundle_files = convert(target, sources, folder)
        shipment.bundle_files += _move(bundle_files, deploy_dir)
        for source in sources:
            result = converted[source.variant]
            entry: dict[str, Any] = {"target": name, "runtime": target.runtime, "ok": False}
            if isinstance(result, Exception):
                entry.update(_refusal(result, target))
                raised = result.__traceback__ is not None and not isinstance(result, NotApplicable)
                tb = "".join(traceback.format_exception(result)) if raised else None
                shipment.entries.setdefault(source.variant, {})[name] = entry
                log(source.variant, name, entry, tb)
                continue
            entry.update(
                _parity(target, source, result[0], parity_input, reference_files[source.variant], settings)
            )
            entry["files"] = [p.name for p in result]
            entry["size_bytes"] = sum(p.stat().st_size for p in result)
            if entry["ok"]:
                shipment.files.setdefault(source.variant, {})[name] = _move(result, deploy_dir)
            else:
                entry["kept_as"] = [f"failed/{p.name}" for p in _move(result, failed_dir)]
            shipment.entries.setdefault(source.variant, {})[name] = entry
            log(source.variant, name, entry, None)
    return shipment


def describe(entry: dict[str, Any]) -> str:
    if entry.get("skipped"):
        return f"not shipped: {entry['skipped']}"
    if entry.get("max_abs_diff") is None:
        return f"FAILED: {entry.get('error')}"
    numbers = (
        f"max|diff| {entry['max_abs_diff']:.2e} (tolerance {entry['atol']:.1e}), "
        f"top-1 agreement {100 * entry['top1_agreement']:.2f}%, {entry.get('runtime_version')}"
    )
    return f"ok ({numbers})" if entry["ok"] else f"FAILED: {entry.get('error')} ({numbers})"


def convert(
    target: Target, sources: list[Source], folder: Path
) -> tuple[dict[str, list[Path] | Exception], list[Path]]:
    module = converter(target.name)
    if hasattr(module, "convert_all"):
        return module.convert_all(sources, folder)
    results: dict[str, list[Path] | Exception] = {}
    for source in sources:
        if source.quantized and not target.int8:
            results[source.variant] = NotApplicable(
                f"{target.name} ships fp32 variants only here (no int8 path from an int8 ONNX file)"
            )
            continue
        try:
            results[source.variant] = module.convert(source, folder)
        except Exception as exc:  # one variant's converter error must not stop the others
            results[source.variant] = exc  # its __traceback__ goes to the stage's error.log
    return results, []


def converter(name: str) -> ModuleType:
    """The converter module, imported only when its target is asked for (each pulls in a runtime)."""
    if name == "ort":
        from compress.ship.targets import ort as module
    elif name == "openvino":
        from compress.ship.targets import openvino as module
    elif name == "tflite":
        from compress.ship.targets import tflite as module
    elif name == "executorch":
        from compress.ship.targets import executorch as module
    else:
        raise KeyError(f"no converter for target {name!r}")
    return module


def _refusal(exc: Exception, target: Target) -> dict[str, Any]:
    if isinstance(exc, NotApplicable):
        return {"skipped": str(exc), "error": None, "max_abs_diff": None, "top1_agreement": None}
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return {
        "error": f"{target.name} conversion failed: {type(exc).__name__}: {text}",
        "max_abs_diff": None,
        "top1_agreement": None,
    }


def _parity(
    target: Target, source: Source, model: Path, sample: Path, reference: Path, settings: ParitySettings
) -> dict[str, Any]:
    result = child.compare(target, model, sample, reference, settings.threads)
    atol = tolerance(source.reference, source.quantized or source.low_precision, settings.atol)
    entry: dict[str, Any] = {
        "atol": atol,
        "min_top1_agreement": settings.min_agreement,
        "samples": int(len(source.reference)),
    }
    entry["runtime_version"] = f"{target.runtime} {result.get('runtime_version', '?')}"
    if not result.get("ok"):
        return {
            **entry,
            "ok": False,
            "max_abs_diff": None,
            "top1_agreement": None,
            "error": result.get("error"),
        }
    diff, agreement = result["max_abs_diff"], result["top1_same"] / max(result["count"], 1)
    decided, ties = _decided_agreement(source.reference, result.get("top1"), atol)
    if faults.checkpoint(f"parity:{source.variant}:{target.name}"):
        diff, agreement, decided = diff + 1.0, 0.0, 0.0  # the test hook: this file's outputs drifted
    entry.update(max_abs_diff=diff, top1_agreement=agreement, ties=ties, error=None, ok=True)
    if not result.get("finite", True) or not np.isfinite(diff) or diff > atol:
        entry.update(ok=False, error=f"parity: max |logit diff| {diff:.3g} > {atol:.3g}")
    elif decided < settings.min_agreement:
        entry.update(
            ok=False,
            error=f"parity: top-1 agreement {100 * decided:.2f}% < {100 * settings.min_agreement:.2f}% "
            f"(over the {entry['samples'] - ties} images whose top two logits differ by more than "
            f"2 x {atol:.3g})",
        )
    return entry


def _decided_agreement(reference: np.ndarray, top1: list[int] | None, atol: float) -> tuple[float, int]:
    """Top-1 agreement over the images the logit tolerance decides, and how many it does not.

    An image whose source logits have their top two within ``2 * atol`` is a tie at the
    tolerance the file is held to: two correct int8 kernels (onnxruntime's and OpenVINO's round
    differently) may pick either class. On a barely trained model 1 % of the sample can be such
    ties, so counting them would reject files whose every logit is within tolerance.
    """
    if top1 is None or not reference.size:
        return 1.0, 0
    ordered = np.sort(reference, axis=1)
    decided = (
        (ordered[:, -1] - ordered[:, -2]) > 2 * atol
        if reference.shape[1] > 1
        else np.ones(len(reference), bool)
    )
    got = np.asarray(top1)
    if not decided.any():
        return 1.0, int(len(reference))
    agreement = float(np.mean(got[decided] == reference.argmax(1)[decided]))
    return agreement, int((~decided).sum())


def _move(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in files:
        final = folder / path.name
        os.replace(path, final)  # work/, deploy/ and failed/ are in the same stage directory
        moved.append(final)
    return moved
