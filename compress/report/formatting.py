"""How numbers and names read on the page: cell formatters, ratio phrases, runtime and file names.

Each ``fmt_*`` turns a missing or NaN value into "–", so a cell or a sentence never shows "nan".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

RUNTIME_LABEL = {
    "pytorch": "PyTorch eager",
    "torchscript": "TorchScript",
    "onnxruntime": "onnxruntime",
    "ort": "onnxruntime (.ort)",
    "openvino": "OpenVINO CPU",
    "litert": "LiteRT",
    "executorch": "ExecuTorch (XNNPACK)",
}
# ratios within 2 % of 1 read as "the same" (phrases, table colours); an int8 variant more than
# 2 % slower than its parent is a warning (see compress.report.alerts)
SPEED_NOISE = 0.02


def is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def fmt_bytes(value: Any) -> str:
    if not is_number(value):
        return "–"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def fmt_pct(value: Any, digits: int = 2) -> str:
    return f"{100 * float(value):.{digits}f} %" if is_number(value) else "–"


def fmt_pp(value: Any) -> str:
    return f"{float(value):+.2f} pp" if is_number(value) else "–"


def fmt_ratio(value: Any) -> str:
    return f"{float(value):.2f}x" if is_number(value) else "–"


def fmt_ms(value: Any) -> str:
    if not is_number(value):
        return "–"
    value = float(value)
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_int(value: Any) -> str:
    return f"{int(round(float(value))):,}" if is_number(value) else "–"


def fmt_float(value: Any, digits: int = 1) -> str:
    return f"{float(value):,.{digits}f}" if is_number(value) else "–"


FORMATTERS = {
    "text": lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v),
    "pct": fmt_pct,
    "pp": fmt_pp,
    "bytes": fmt_bytes,
    "ratio": fmt_ratio,
    "ms": fmt_ms,
    "int": fmt_int,
    "float": fmt_float,
    "share": lambda v: fmt_pct(v, 1),
}


def times(ratio: float, smaller: str, larger: str, same: str) -> str:
    """0.25 -> '4.0x smaller'; 1.3 -> '1.3x larger'; ~1 -> same."""
    if abs(ratio - 1) <= SPEED_NOISE:
        return same
    return f"{1 / ratio:.1f}x {smaller}" if ratio < 1 else f"{ratio:.1f}x {larger}"


def runtime_label(runtime: Any) -> str:
    return RUNTIME_LABEL.get(str(runtime), str(runtime))


def file_name(row: dict[str, Any]) -> str:
    file = row.get("file")
    return Path(str(file)).name if file else str(row.get("variant"))


def threads_text(row: dict[str, Any]) -> str:
    threads = row.get("threads")
    if not is_number(threads):
        return ""
    return f", {int(threads)} thread{'s' if int(threads) != 1 else ''}"
