"""What changed since the previous run of the pipeline (its ``report.json``), row by row."""

from __future__ import annotations

import math
from typing import Any

from compress.gating.numbers import latency_batch_sizes
from compress.report.formatting import FORMATTERS, fmt_pp, is_number, runtime_label

COMPARED = (
    ("accuracy", "accuracy", "pct", 0.0),
    ("size_bytes", "size", "bytes", 0.0),
    ("gzip_bytes", "gzip size", "bytes", 0.0),
    ("parameters", "parameters", "int", 0.0),
    ("nonzero_parameters", "non-zero parameters", "int", 0.0),
)
LATENCY_NOISE = 0.10  # latency changes below 10 % are timing noise on a shared machine


def compare_previous(rows: list[dict[str, Any]], previous: dict[str, Any] | None) -> dict[str, Any] | None:
    if not previous or not isinstance(previous.get("results"), list):
        return None
    before = {(r.get("variant"), r.get("runtime")): r for r in previous["results"] if isinstance(r, dict)}
    now = {(r.get("variant"), r.get("runtime")): r for r in rows}
    compared = list(COMPARED) + [
        (f"latency_b{b}_p50_ms", f"p50 latency b{b} (ms)", "ms", LATENCY_NOISE)
        for b in latency_batch_sizes(rows)
    ]
    changes = []
    for key, row in now.items():
        old = before.get(key)
        if old is None:
            continue
        for column, label, kind, noise in compared:
            a, b = old.get(column), row.get(column)
            if not (is_number(a) and is_number(b)) or float(a) == float(b):
                continue
            rel = (float(b) - float(a)) / abs(float(a)) if float(a) else math.inf
            if abs(rel) <= noise:
                continue
            change = fmt_pp(100 * (float(b) - float(a))) if kind == "pct" else f"{100 * rel:+.1f} %"
            changes.append(
                {
                    "variant": key[0],
                    "runtime": key[1],
                    "metric": label,
                    "before": FORMATTERS[kind](a),
                    "after": FORMATTERS[kind](b),
                    "change": change,
                }
            )
    return {
        "run_id": previous.get("run_id", "?"),
        "changes": changes,
        "added": [f"{v} ({runtime_label(r)})" for v, r in now if (v, r) not in before],
        "removed": [f"{v} ({runtime_label(r)})" for v, r in before if (v, r) not in now],
        "latency_noise_pct": int(100 * LATENCY_NOISE),
    }
