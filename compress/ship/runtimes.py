"""Where a variant ships in each runtime, and how each runtime runs it.

The benchmark stage measures one row per (variant, runtime): the runtime's file is the one the
export stage attached (or the variant's own file), and the runner is the same loader for every
row, untimed, so that only the call is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import measure
from compress.context import Context
from compress.fileio import read_json
from compress.ship.convert import INPUT_NAME, OUTPUT_NAME, load_torchscript
from compress.ship.targets import TARGETS
from compress.ship.targets.runners import runner as target_runner
from compress.variants import Variant

EDGE = {t.runtime: t for t in TARGETS.values() if t.name != "onnx"}
RUNTIMES = ("pytorch", "torchscript", "onnxruntime", *EDGE)
FILE_FORMAT = {"pytorch": "torch", "torchscript": "torchscript", "onnxruntime": "onnx"}
FILE_FORMAT.update({runtime: t.suffix.lstrip(".") for runtime, t in EDGE.items()})
EXPORT_KEY = {"torchscript": "torchscript", "onnxruntime": "onnx", **{r: t.name for r, t in EDGE.items()}}


def export_report(files: dict[str, Path]) -> dict[str, Any] | None:
    path = files.get("export_report")
    return read_json(path) if path is not None and Path(path).is_file() else None


def target_of(variant: Variant, runtime: str, ctx: Context, exports: dict | None) -> dict[str, Any] | None:
    """The file this variant ships as in ``runtime``, or None if it does not ship there.

    A file the export stage tried and failed gives a row with status 'export_failed'.
    """
    files = ctx.artifacts.get(variant.name, {})
    none = {"export_ok": None, "parity_max_abs_diff": None, "parity_top1_agreement": None}
    if runtime == "pytorch":
        if variant.format not in ("torch", "pt2"):
            return None
        return {"path": variant.file, "export": none, "error": None, "files": []}
    key = EXPORT_KEY[runtime]
    entry = (exports or {}).get("files", {}).get(key) or (exports or {}).get("targets", {}).get(key)
    if entry is not None and entry.get("skipped"):
        return None  # this target does not take this kind of variant (the export report says why)
    export = (
        {
            "export_ok": bool(entry["ok"]),
            "parity_max_abs_diff": entry.get("max_abs_diff"),
            "parity_top1_agreement": entry.get("top1_agreement"),
        }
        if entry
        else none
    )
    names = list((entry or {}).get("files", []))  # OpenVINO's IR is the .xml and its .bin
    if key in files:
        return {"path": files[key], "export": export, "error": None, "files": names}
    if entry is not None and not entry["ok"]:
        return {"path": None, "export": export, "error": entry.get("error"), "files": []}
    if runtime == "onnxruntime" and variant.format == "onnx":
        return {"path": variant.file, "export": export, "error": None, "files": []}
    return None


def runner_for(
    runtime: str, variant: Variant, path: Path, threads: int
) -> Callable[[torch.Tensor], np.ndarray]:
    """A function images -> logits (numpy) for one runtime; loading happens here, untimed."""
    if runtime in EDGE:
        run_edge = target_runner(EDGE[runtime].runner).load(str(path), threads)
        return lambda x: run_edge(x.numpy())
    if runtime == "onnxruntime":
        session = measure.ort_session(path, threads)

        def run_onnx(x: torch.Tensor) -> np.ndarray:
            return session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]

        return run_onnx
    if runtime == "torchscript":
        module = load_torchscript(path)
    elif variant.format == "pt2":  # a torch.export program (e.g. int8 from the quantize stage)
        module = torch.export.load(str(path)).module()
    else:
        module, _ = variant.load_torch()
        module = module.eval().cpu()

    def run_torch(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(x).numpy()

    return run_torch


def runtime_version(runtime: str) -> str:
    if runtime in EDGE:
        return f"{EDGE[runtime].runner} {target_runner(EDGE[runtime].runner).version()}"
    if runtime == "onnxruntime":
        return f"onnxruntime {package_version('onnxruntime')}"
    return f"torch {torch.__version__}"


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
