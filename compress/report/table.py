"""The comparison table: its columns, its cells (text, exact value, colour) and the usable rows."""

from __future__ import annotations

import math
from typing import Any

from compress.report.formatting import FORMATTERS, SPEED_NOISE, is_number

# ratio columns where lower is better (size, latency, counts); accuracy delta: higher is better
LOWER_IS_BETTER = ("size_ratio", "gzip_ratio", "parameters_ratio", "macs_ratio", "latency_ratio_b")


def table_columns(batches: list[int]) -> list[dict[str, str]]:
    """The comparison table's columns: key in results.json, header, format kind."""
    cols = [
        ("variant", "Variant", "text"),
        ("runtime", "Runtime", "text"),
        ("format", "Format", "text"),
        ("parent", "Parent", "text"),
        ("accuracy", "Accuracy", "pct"),
        ("accuracy_delta_pp", "Δ acc.", "pp"),
        ("size_bytes", "Size", "bytes"),
        ("size_ratio", "Size ratio", "ratio"),
        ("gzip_bytes", "Gzip", "bytes"),
        ("gzip_ratio", "Gzip ratio", "ratio"),
        ("parameters", "Params", "int"),
        ("nonzero_parameters", "Non-zero params", "int"),
        ("sparsity", "Sparsity", "share"),
        ("macs", "MACs", "int"),
    ]
    for b in batches:
        cols += [
            (f"latency_b{b}_p50_ms", f"p50 b{b} (ms)", "ms"),
            (f"latency_b{b}_p95_ms", f"p95 b{b} (ms)", "ms"),
            (f"latency_ratio_b{b}", f"Latency ratio b{b}", "ratio"),
            (f"throughput_b{b}", f"Images/s b{b}", "float"),
        ]
    cols += [("parity_top1_agreement", "Parity top-1", "share"), ("status", "Status", "text")]
    return [{"key": k, "label": label, "kind": kind} for k, label, kind in cols]


def cell_class(key: str, value: Any, tolerance_pp: float) -> str:
    """'good' / 'bad' / '' for the deltas the table colors."""
    if not is_number(value):
        return "bad" if key == "status" and value not in (None, "ok") else ""
    value = float(value)
    if key == "accuracy_delta_pp":
        if value < -tolerance_pp:
            return "bad"
        return "good" if value >= 0 else "warn"
    if key.startswith(LOWER_IS_BETTER):
        if abs(value - 1) <= SPEED_NOISE:
            return ""
        return "good" if value < 1 else "bad"
    return ""


def raw_value(value: Any) -> str:
    """The exact value a cell holds, for sorting and for tests (repr keeps every digit)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return str(value)


def table_rows(rows: list[dict[str, Any]], columns: list[dict[str, str]], tolerance_pp: float) -> list[dict]:
    out = []
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col["key"])
            cells.append(
                {
                    "key": col["key"],
                    "text": FORMATTERS[col["kind"]](value),
                    "raw": raw_value(value),
                    "cls": cell_class(col["key"], value, tolerance_pp),
                    "num": col["kind"] != "text",
                }
            )
        out.append(
            {
                "cells": cells,
                "baseline": bool(row.get("is_baseline")),
                "title": f"{row.get('file') or ''}{'; ' + row['error'] if row.get('error') else ''}",
            }
        )
    return out


def ok_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status", "ok") == "ok" and is_number(r.get("accuracy"))]
