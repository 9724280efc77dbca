"""Per class: which classes each variant lost (a chart), and where one variant's new errors went.

An average hides a collapsed class. The chart puts every variant (rows) against every class
(columns) in one runtime, each cell the variant's accuracy on that class's test images minus
the baseline's (pp; from the rows' ``class_drop_pp``, else from their ``per_class_accuracy``,
which older results tables have too). The confusion change takes one variant (the one the
summary recommends, else the one that lost most) and counts, over the images the baseline got
right and the variant got wrong, true class -> predicted class (``compress.measure.paired``),
from the benchmark's kept predictions; without them the section says so in one line.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from compress import gating
from compress.measure.paired import confusion_change
from compress.report.charts import MAX_CHART_ROWS, chart
from compress.report.formatting import is_number, runtime_label
from compress.report.table import ok_rows
from compress.results import row_key

MAX_CLASSES = 40  # columns of the chart; beyond this, the classes that lost most
MAX_CONFUSION = 12  # rows and columns of the confusion change
PREFERRED_RUNTIMES = ("onnxruntime", "pytorch")


def _per_class(row: dict[str, Any]) -> dict[str, Any]:
    value = row.get("per_class_accuracy")
    if isinstance(value, str):  # a CSV cell holds it as JSON
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def row_deltas(row: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """class -> the row's accuracy delta (pp) against the baseline's row in its runtime."""
    drops = row.get("class_drop_pp")
    if isinstance(drops, dict) and drops:
        return {str(k): -float(v) for k, v in drops.items() if is_number(v)}
    mine, theirs = _per_class(row), _per_class(base)
    return {
        str(k): 100 * (float(v) - float(theirs[k]))
        for k, v in mine.items()
        if is_number(v) and is_number(theirs.get(k))
    }


def pick_runtime(rows: list[dict[str, Any]], baseline: str) -> str | None:
    """The runtime of the per-class views: onnxruntime if the baseline was measured there, else
    PyTorch, else the first runtime with a baseline row."""
    measured = [r["runtime"] for r in ok_rows(rows) if r.get("variant") == baseline]
    preferred = [rt for rt in PREFERRED_RUNTIMES if rt in measured]
    return (preferred or measured or [None])[0]


def class_deltas(rows: list[dict[str, Any]], baseline: str) -> tuple[str, list[str], dict] | None:
    """(runtime, classes, variant -> class -> delta pp) for the chart; None without per-class data."""
    runtime = pick_runtime(rows, baseline)
    good = [r for r in ok_rows(rows) if r.get("runtime") == runtime]
    base = next((r for r in good if r.get("variant") == baseline), None)
    if base is None:
        return None
    deltas = {}
    for row in good[: MAX_CHART_ROWS + 1]:
        found = row_deltas(row, base) if row is not base else {}
        if found:
            deltas[str(row["variant"])] = found
    classes = [str(k) for k in _per_class(base)] or list(dict.fromkeys(k for d in deltas.values() for k in d))
    classes = [c for c in classes if any(c in d for d in deltas.values())]
    if not deltas or not classes:
        return None
    if len(classes) > MAX_CLASSES:  # the classes that lost most, in their own order
        worst = sorted(classes, key=lambda c: min(d.get(c, 0.0) for d in deltas.values()))[:MAX_CLASSES]
        classes = [c for c in classes if c in set(worst)]
    return str(runtime), classes, deltas


def class_delta_chart(rows: list[dict[str, Any]], baseline: str) -> dict[str, str] | None:
    """Variants x classes, each cell the accuracy delta in pp (diverging: red is worse)."""
    found = class_deltas(rows, baseline)
    if found is None:
        return None
    runtime, classes, deltas = found
    from matplotlib import colormaps

    data = np.array([[d.get(c, np.nan) for c in classes] for d in deltas.values()], dtype=float)
    limit = max(1.0, float(np.nanmax(np.abs(data)))) if np.isfinite(data).any() else 1.0
    width = min(12.0, 2.8 + 0.55 * len(classes))
    fig = Figure(figsize=(width, 1.2 + 0.34 * len(deltas)), dpi=100, layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["RdBu"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    long_names = max(len(c) for c in classes) > 3
    ax.set_xticks(
        range(len(classes)),
        classes,
        fontsize=8,
        rotation=40 if long_names else 0,
        ha="right" if long_names else "center",
    )
    ax.set_yticks(range(len(deltas)), list(deltas), fontsize=8)
    if data.size <= 400:
        for (i, j), value in np.ndenumerate(data):
            if np.isfinite(value):
                color = "white" if abs(value) > 0.6 * limit else "#222"
                shown = f"{value:+.1f}" if abs(value) >= 0.05 else "0"
                ax.text(j, i, shown, ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, shrink=0.9, label="Δ accuracy (pp)")
    base = next(r for r in ok_rows(rows) if r.get("variant") == baseline and r.get("runtime") == runtime)
    caption = (
        f"Each cell is a variant's accuracy on one class's test images minus the baseline's, in "
        f"{runtime_label(runtime)}, in pp: red is worse, blue better; an average over all classes "
        "can hide one that collapsed."
    )
    images = base.get("test_count")
    if is_number(images) and float(images) > 0:
        per_class = float(images) / len(_per_class(base) or classes)
        caption += (
            f" With about {per_class:.0f} test images per class, one image moves a cell by "
            f"{100 / per_class:.1f} pp."
        )
    if len(classes) < len(_per_class(base)):
        caption += f" The {len(classes)} classes that lost most are shown."
    return chart(fig, f"Per-class accuracy change ({runtime_label(runtime)})", caption, "heatmap")


def confusion_target(
    rows: list[dict[str, Any]], summary: dict[str, Any], baseline: str
) -> tuple[dict[str, Any], str] | None:
    """The variant whose broken predictions are shown, and why: the summary's pick (the edge
    file, else a recommendation), else the shipped variant that lost most accuracy."""
    good = {(r.get("variant"), r.get("runtime")): r for r in ok_rows(rows)}
    edge = summary.get("edge")
    picks = [(edge["variant"], edge["runtime"])] if isinstance(edge, dict) else []
    picks += [(r["variant"], r["runtime"]) for r in summary.get("recommendations", [])]
    for key in picks:
        if key[0] != baseline and key in good:
            return good[key], "the recommended variant"
    runtime = pick_runtime(rows, baseline)
    candidates = [
        r
        for r in good.values()
        if r.get("variant") != baseline
        and gating.shipped(str(r.get("variant")))
        and is_number(r.get("accuracy_delta_pp"))
    ]
    same = [r for r in candidates if r.get("runtime") == runtime] or candidates
    worst = min(same, key=lambda r: float(r["accuracy_delta_pp"]), default=None)
    return (worst, "the variant that lost most accuracy") if worst is not None else None


def confusion_section(
    rows: list[dict[str, Any]], summary: dict[str, Any], predictions: dict[str, Any] | None, baseline: str
) -> dict[str, Any] | None:
    """The confusion change of one variant; None when there is no variant but the baseline."""
    target = confusion_target(rows, summary, baseline)
    if target is None:
        return None
    row, why = target
    variant, runtime = str(row["variant"]), str(row["runtime"])
    out: dict[str, Any] = {"variant": variant, "runtime": runtime, "why": why, "missing": None}
    arrays = _arrays(predictions, variant, runtime, baseline)
    if isinstance(arrays, str):
        out["missing"] = arrays
        return out
    labels, classes, mine, reference = arrays
    matrix = confusion_change(mine, reference, labels, len(classes))
    fixed = int(np.sum((reference != labels) & (mine == labels)))
    broken = int(matrix.sum())
    where = f"`{variant}` ({runtime_label(runtime)}, {why})"
    out["sentence"] = (
        f"Of the {len(labels):,} test images, {where} gets {broken} wrong that the baseline got right "
        f"and {fixed} right that the baseline got wrong."
    )
    out.update(_matrix_view(matrix, classes))
    if broken:
        moves = out["moves"]
        out["sentence"] += " Most moved: " + ", ".join(f"`{t}` → `{p}` ({n})" for t, p, n in moves) + "."
    return out


def _arrays(
    predictions: dict[str, Any] | None, variant: str, runtime: str, baseline: str
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray] | str:
    """(labels, classes, the variant's and the baseline's predictions), or the one line saying
    why they are missing."""
    if not predictions:
        return (
            "Predictions not recorded: the benchmark kept no per-image predictions (an older "
            "results table), so where this variant's new errors went cannot be shown."
        )
    rows = predictions.get("rows") or {}
    mine, reference = rows.get(row_key(variant, runtime)), rows.get(row_key(baseline, runtime))
    if mine is None or reference is None:
        missing = variant if mine is None else baseline
        return f"Predictions not recorded for `{missing}` in {runtime_label(runtime)}."
    labels = np.asarray(predictions.get("labels", []), dtype=np.int64)
    mine, reference = np.asarray(mine, dtype=np.int64), np.asarray(reference, dtype=np.int64)
    classes = [str(c) for c in predictions.get("classes") or []]
    if not len(labels) == len(mine) == len(reference) or not len(labels):
        return "Predictions not recorded for the same test images: the kept predictions do not match."
    top = int(max(labels.max(), mine.max(), reference.max()))
    classes += [str(i) for i in range(len(classes), top + 1)]  # never index past the names
    return labels, classes, mine, reference


def _matrix_view(matrix: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The rows (true classes) and columns (predicted) with any broken image, at most
    MAX_CONFUSION of each (the heaviest), and the three heaviest cells."""
    rows = _heaviest(matrix.sum(axis=1))
    cols = _heaviest(matrix.sum(axis=0))
    peak = int(matrix.max()) if matrix.size else 0
    cells = [
        [{"count": int(matrix[i, j]), "heavy": peak > 1 and int(matrix[i, j]) == peak} for j in cols]
        for i in rows
    ]
    order = np.argsort(-matrix, axis=None, kind="stable")[:3]
    moves = [
        (classes[i], classes[j], int(matrix[i, j]))
        for i, j in (np.unravel_index(k, matrix.shape) for k in order)
        if matrix[i, j] > 0
    ]
    return {
        "true": [classes[i] for i in rows],
        "predicted": [classes[j] for j in cols],
        "cells": cells,
        "row_totals": [int(matrix[i].sum()) for i in rows],
        "moves": moves,
        "hidden": int(matrix.sum() - sum(c["count"] for line in cells for c in line)),
    }


def _heaviest(totals: np.ndarray) -> list[int]:
    nonzero = [i for i in range(len(totals)) if totals[i] > 0]
    keep = sorted(nonzero, key=lambda i: -int(totals[i]))[:MAX_CONFUSION]
    return sorted(keep)
