"""ORT format (``.ort``) for onnxruntime Mobile, with the operator list a reduced build needs.

onnxruntime's own ``convert_onnx_models_to_ort`` tool does the work, once for all variants,
so the ``required_operators.config`` it writes covers every shipped model (the file a
custom minimal ORT build takes with ``--include_ops_by_config``). Optimization style
"Fixed": graph optimizations are applied at conversion and stored in the file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from compress.ship.targets.source import Source, needs_onnx

CONFIG = "required_operators.config"


def convert_all(sources: list[Source], work: Path) -> tuple[dict[str, list[Path] | Exception], list[Path]]:
    """variant -> [its .ort] or the exception; plus the bundle-wide files (the operator config)."""
    inputs, outputs = work / "ort-in", work / "ort-out"
    for folder in (inputs, outputs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    results: dict[str, list[Path] | Exception] = {}
    for source in sources:
        try:
            shutil.copyfile(needs_onnx(source, "ort"), inputs / f"{source.base}.onnx")
        except Exception as exc:
            results[source.variant] = exc
    if not any(inputs.iterdir()):
        return results, []
    command = [
        sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(inputs),
        "--output_dir", str(outputs), "--optimization_style", "Fixed", "--allow_conversion_failures",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    for source in sources:
        if source.variant in results:
            continue
        produced = outputs / f"{source.base}.ort"
        if produced.is_file():
            results[source.variant] = [produced]
        else:
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}, no .ort written"])[-1]
            results[source.variant] = RuntimeError(f"convert_onnx_models_to_ort: {tail[:300]}")
    config = outputs / CONFIG
    return results, [config] if config.is_file() else []
