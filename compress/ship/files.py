"""One checked file per format (ONNX, TorchScript) and its parity with the source model.

The export stage's mechanics: make the file in a work folder, check it (the ONNX checker in
full, strict shape inference, our input/output contract), run it, compare its logits with
the source's, and move it into place only when every check passed; a file that failed a
check is kept under ``failed/`` for inspection. Nothing here raises for a bad variant: each
problem comes back as a report entry with the reason.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import torch

from compress import faults
from compress.fileio import write_json
from compress.measure import ort_session
from compress.ship.convert import INPUT_NAME, OUTPUT_NAME, export_torchscript, load_torchscript, set_metadata


class ParityConfig(Protocol):
    """What the checks read from the export stage's settings."""

    parity_atol: float
    min_top1_agreement: float
    threads: int


def make_onnx(
    cfg: ParityConfig,
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
        entry = failed(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}")
        entry["traceback"] = traceback.format_exc()
        return entry, final
    problem = check_onnx(work)
    if problem is not None:
        return keep_failed(work, out_dir, failed(problem)), final
    try:
        produced = run_onnx(work, images.numpy(), cfg.threads)
    except Exception as exc:
        return keep_failed(work, out_dir, failed(f"onnxruntime cannot run it: {first_line(exc)}")), final
    entry = parity(reference, produced, cfg)
    entry["opset"] = opset(work)
    if not entry["ok"]:
        return keep_failed(work, out_dir, entry), final
    os.replace(work, final)
    faults.checkpoint(f"export:{final.name}")
    return entry, final


def make_torchscript(
    cfg: ParityConfig,
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
            produced = batched(lambda x: loaded(torch.from_numpy(x)).numpy(), images.numpy())
    except Exception as exc:
        entry = failed(f"TorchScript export failed: {type(exc).__name__}: {first_line(exc)}")
        entry["traceback"] = traceback.format_exc()
        return entry, final
    entry = parity(reference, produced, cfg)
    if not entry["ok"]:
        return keep_failed(work, out_dir, entry), final
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
        return f"onnx check failed: {type(exc).__name__}: {first_line(exc)}"
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


def parity(reference: np.ndarray, produced: np.ndarray, cfg: ParityConfig) -> dict[str, Any]:
    if reference.shape != produced.shape:
        return failed(f"output shape {produced.shape} differs from the source's {reference.shape}")
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


def copy_with_metadata(source: Path, target: Path, facts: dict[str, Any]) -> None:
    proto = onnx.load(str(source))
    set_metadata(proto, as_metadata(facts))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(target), save_as_external_data=False)


def as_metadata(facts: dict[str, Any]) -> dict[str, str]:
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


def run_onnx(path: Path, x: np.ndarray, threads: int) -> np.ndarray:
    session = ort_session(path, threads)
    return batched(lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0], x)


def batched(fn: Any, x: np.ndarray, size: int = 1000) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + size]), dtype=np.float32) for i in range(0, len(x), size)])


def opset(path: Path) -> int | None:
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def keep_failed(work: Path, out_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Keep a file that failed a check under failed/ so it can be inspected."""
    if work.exists():
        kept = out_dir / "failed" / work.name
        os.replace(work, kept)
        entry["kept_as"] = kept.relative_to(out_dir).as_posix()
    return entry


def failed(error: str) -> dict[str, Any]:
    return {"ok": False, "max_abs_diff": None, "top1_agreement": None, "error": error}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


class Failure(str):
    pass


def attempt(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:
        return Failure(f"{type(exc).__name__}: {first_line(exc)}")
