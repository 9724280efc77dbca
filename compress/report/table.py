"""The comparison table: its columns, its cells (text, exact value, colour) and the usable rows."""

from __future__ import annotations

import math
from typing import Any

from compress.report import paired
from compress.report.formatting import FORMATTERS, SPEED_NOISE, is_number

# ratio columns where lower is better (size, latency, counts); accuracy delta: higher is better
LOWER_IS_BETTER = ("size_ratio", "gzip_ratio", "parameters_ratio", "macs_ratio", "latency_ratio_b")
# the paired comparison with the baseline: shown only when the results table has it
PAIRED_COLUMNS = (("flip_rate", "Flips", "share"), ("worst_class_drop_pp", "Worst class Δ", "pp"))


def table_columns(batches: list[int], rows: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
    """The comparison table's columns: key in results.json, header, format kind. The paired
    columns (flips, worst class) appear only when some row of ``rows`` has them."""
    cols = [
        ("variant", "Variant", "text"),
        ("runtime", "Runtime", "text"),
        ("format", "Format", "text"),
        ("parent", "Parent", "text"),
        ("accuracy", "Accuracy", "pct"),
        ("accuracy_delta_pp", "Δ acc.", "pp"),
    ]
    cols += [c for c in PAIRED_COLUMNS if any(is_number(r.get(c[0])) for r in rows or [])]
    cols += [
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


def cell_class(key: str, value: Any, tolerance_pp: float, row: dict[str, Any] | None = None) -> str:
    """'good' / 'bad' / 'warn' / '' for the deltas the table colors. An accuracy loss within the
    tolerance whose interval reaches zero is noise on these images: not coloured."""
    if not is_number(value):
        return "bad" if key == "status" and value not in (None, "ok") else ""
    value = float(value)
    if key == "accuracy_delta_pp":
        if value < -tolerance_pp:
            return "bad"
        if value >= 0:
            return "good"
        return "" if row is not None and paired.drop_is_noise(row) else "warn"
    if key == "worst_class_drop_pp":
        return "warn" if row is not None and paired.worst_is_significant(row) else ""
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


def cell_texts(row: dict[str, Any], col: dict[str, str]) -> tuple[str, str]:
    """What a cell shows: its text and a note in smaller print after it (an interval, counts)."""
    key, value = col["key"], row.get(col["key"])
    if key == "accuracy_delta_pp":
        interval = paired.interval_text(row)
        return FORMATTERS["pp"](value), f"({interval})" if interval else ""
    if key == "flip_rate":
        counts = paired.flip_counts_text(row)
        text = FORMATTERS["share"](value) if paired.flips(row) is not None else "–"
        return text, f"({counts})" if counts else ""
    if key == "worst_class_drop_pp":
        worst = paired.worst_class(row)
        if worst is None:
            return "–", ""
        shown = paired.worst_text(row, interval=False)
        interval = paired.interval_text(row, worst[2]) if worst[2] is not None and worst[1] < 0 else ""
        return shown, f"({interval})" if interval else ""
    return FORMATTERS[col["kind"]](value), ""


def cell_text(row: dict[str, Any], col: dict[str, str]) -> str:
    """The cell's text and note on one line (summary.md)."""
    text, note = cell_texts(row, col)
    return f"{text} {note}" if note else text


def table_rows(rows: list[dict[str, Any]], columns: list[dict[str, str]], tolerance_pp: float) -> list[dict]:
    out = []
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col["key"])
            text, note = cell_texts(row, col)
            cells.append(
                {
                    "key": col["key"],
                    "text": text,
                    "note": note,
                    "raw": raw_value(value),
                    "cls": cell_class(col["key"], value, tolerance_pp, row),
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
