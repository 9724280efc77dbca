"""The report's content: recommendations, warnings, the comparison table and the charts.

Everything here is a view over the benchmark's results table (one row per variant and
runtime) plus what the other stages reported (``StageResult.metrics``, variant ``info``, their
published JSON files) and the run manifest. ``build_page`` turns those into one plain dict;
``render_html`` (jinja2, ``templates/report.html.j2``) and ``render_markdown`` only format it,
so the HTML page and ``summary.md`` always say the same thing.

Charts are matplotlib SVGs embedded as ``data:`` URIs in ``<img>`` tags: the page needs no
network and no script library, and each chart is an isolated document (no clashing ids).
A section appears only when its data exists (e.g. no pruned variant, no per-layer chart).
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from compress import gating

TEMPLATES = Path(__file__).parent / "templates"
RUNTIME_LABEL = {"pytorch": "PyTorch eager", "torchscript": "TorchScript", "onnxruntime": "onnxruntime"}
MAX_CHART_ROWS = 60  # bars/points beyond this make a chart unreadable; the table still has them all
# ratio columns where lower is better (size, latency, counts); accuracy delta: higher is better
LOWER_IS_BETTER = ("size_ratio", "gzip_ratio", "parameters_ratio", "macs_ratio", "latency_ratio_b")
SPEED_NOISE = 0.02  # latency ratios within 2 % of 1 are called "as fast as"; an int8 variant
# more than 2 % slower than its parent is a warning; any other variant more than 10 % slower
OTHER_SLOWDOWN = 0.10


@dataclass
class ReportInputs:
    """What the report is built from; the report stage gathers it from the run context."""

    results: list[dict[str, Any]]  # the benchmark rows (results.json records)
    variants: dict[str, Any] = field(default_factory=dict)  # name -> Variant (for info/metrics)
    stages: list[dict[str, Any]] = field(default_factory=list)  # {label, kind, metrics, published}
    manifest: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] | None = None  # the previous run's report.json
    resolved_yaml: str = ""
    tolerance_pp: float = 1.0
    baseline: str = "baseline"
    latency_batch: int | None = None
    title: str | None = None
    results_source: str = "benchmark"  # or "variant metrics" when no benchmark stage ran
    charts: bool = True  # False: text and tables only (faster; used by tests of the wording)


# ---------------------------------------------------------------- number formatting


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


# ---------------------------------------------------------------- the results table


def batch_sizes(rows: list[dict[str, Any]]) -> list[int]:
    found = set()
    for row in rows:
        for key in row:
            match = re.fullmatch(r"latency_b(\d+)_p50_ms", key)
            if match:
                found.add(int(match.group(1)))
    return sorted(found)


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


# ---------------------------------------------------------------- summary and recommendations


def file_name(row: dict[str, Any]) -> str:
    file = row.get("file")
    return Path(str(file)).name if file else str(row.get("variant"))


def runtime_label(runtime: Any) -> str:
    return RUNTIME_LABEL.get(str(runtime), str(runtime))


def threads_text(row: dict[str, Any]) -> str:
    threads = row.get("threads")
    if not is_number(threads):
        return ""
    return f", {int(threads)} thread{'s' if int(threads) != 1 else ''}"


def baseline_rows(rows: list[dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """runtime -> the baseline's row in that runtime."""
    return {r["runtime"]: r for r in ok_rows(rows) if r.get("variant") == baseline}


def pick(candidates: list[dict[str, Any]], objective: str, batch: int | None) -> dict[str, Any] | None:
    key_latency = f"latency_b{batch}_p50_ms"
    if objective == "smallest":
        usable = [r for r in candidates if is_number(r.get("size_bytes"))]
        return min(usable, key=lambda r: (float(r["size_bytes"]), -float(r["accuracy"])), default=None)
    if objective == "fastest":
        usable = [r for r in candidates if is_number(r.get(key_latency))]
        return min(usable, key=lambda r: (float(r[key_latency]), -float(r["accuracy"])), default=None)
    usable = [r for r in candidates if is_number(r.get("accuracy"))]
    size = lambda r: float(r["size_bytes"]) if is_number(r.get("size_bytes")) else math.inf  # noqa: E731
    return max(usable, key=lambda r: (float(r["accuracy"]), -size(r)), default=None)


OBJECTIVES = {
    "smallest": "the smallest file",
    "fastest": "the lowest latency",
    "most_accurate": "the highest accuracy",
}


def recommendation_sentence(
    objective: str, row: dict[str, Any], base: dict[str, Any] | None, batch: int | None, baseline: str
) -> str:
    runtime = runtime_label(row.get("runtime"))
    where = f"{runtime}{threads_text(row)}"
    if row.get("variant") == baseline:
        return (
            f"For {OBJECTIVES[objective]}, ship the baseline itself, `{file_name(row)}` ({where}): "
            "no compressed variant within the tolerance does better."
        )
    parts = []
    if is_number(row.get("size_ratio")):
        parts.append(times(float(row["size_ratio"]), "smaller", "larger", "the same size"))
    if is_number(row.get("accuracy_delta_pp")):
        parts.append(f"{float(row['accuracy_delta_pp']):+.2f} pp accuracy ({fmt_pct(row['accuracy'])})")
    ratio = row.get(f"latency_ratio_b{batch}")
    if batch is not None and is_number(ratio):
        parts.append(times(float(ratio), "faster", "slower", "as fast") + f" at batch {batch}")
    against = (
        f"than the baseline in {runtime}{threads_text(row)}" if base is not None else "(no baseline row)"
    )
    return (
        f"Ship `{file_name(row)}` (variant `{row['variant']}`) for {OBJECTIVES[objective]}: "
        + ", ".join(parts)
        + f" {against}."
    )


def summarize(rows: list[dict[str, Any]], inputs: ReportInputs, batch: int | None) -> dict[str, Any]:
    good = ok_rows(rows)
    bases = baseline_rows(rows, inputs.baseline)
    summary: dict[str, Any] = {"tolerance_pp": inputs.tolerance_pp, "batch": batch, "recommendations": []}
    if not good:
        summary["headline"] = "No variant was measured successfully, so there is nothing to recommend."
        return summary
    reference = bases.get("pytorch") or next(iter(bases.values()), None)
    if reference is not None:
        latency = reference.get("latency_b1_p50_ms")
        summary["baseline"] = (
            f"The baseline `{inputs.baseline}` scores {fmt_pct(reference['accuracy'])} on the test split "
            f"and takes {fmt_bytes(reference.get('size_bytes'))} in {runtime_label(reference['runtime'])}"
            + (f", {fmt_ms(latency)} ms per image at batch 1" if is_number(latency) else "")
            + "."
        )
    else:
        summary["baseline"] = (
            f"No baseline named `{inputs.baseline}` was measured, so deltas and ratios are missing; "
            "set `baseline:` in the benchmark stage."
        )
    within = [  # candidates to recommend: never a from-scratch control
        r
        for r in good
        if r.get("variant") == inputs.baseline
        or (
            gating.shipped(str(r.get("variant")))
            and is_number(r.get("accuracy_delta_pp"))
            and float(r["accuracy_delta_pp"]) >= -inputs.tolerance_pp
        )
    ]
    for objective in OBJECTIVES:
        row = pick(within, objective, batch)
        if row is None:
            continue
        summary["recommendations"].append(
            {
                "objective": objective,
                "variant": row["variant"],
                "runtime": row["runtime"],
                "file": file_name(row),
                "path": row.get("file"),
                "sentence": recommendation_sentence(
                    objective, row, bases.get(row["runtime"]), batch, inputs.baseline
                ),
            }
        )
    # the one line for a newcomer: the smallest file within tolerance, preferably ONNX (what edge
    # runtimes load), with what it costs
    onnx = [r for r in within if r.get("runtime") == "onnxruntime"]
    edge = pick(onnx or within, "smallest", batch)
    if edge is None or edge.get("variant") == inputs.baseline:
        summary["headline"] = (
            f"No compressed variant stays within {inputs.tolerance_pp:g} pp of the baseline's accuracy "
            "while being smaller: hand the edge team the baseline"
            + (f", `{file_name(edge)}`." if edge is not None else ".")
        )
    else:
        delta = edge.get("accuracy_delta_pp")
        cost = (
            f"it costs {-float(delta):.2f} pp of test accuracy"
            if float(delta) < 0
            else "it loses no test accuracy"
        )
        summary["headline"] = (
            f"Hand the edge team `{file_name(edge)}` ({runtime_label(edge['runtime'])}): "
            f"{times(float(edge['size_ratio']), 'smaller', 'larger', 'as large')} than the baseline "
            f"and {cost} "
            f"({fmt_pct(edge['accuracy'])} vs {fmt_pct(bases[edge['runtime']]['accuracy'])})"
            if edge["runtime"] in bases and is_number(edge.get("size_ratio")) and is_number(delta)
            else f"Hand the edge team `{file_name(edge)}` ({runtime_label(edge['runtime'])})"
        )
        ratio = edge.get(f"latency_ratio_b{batch}")
        if is_number(ratio) and float(ratio) > 1 + SPEED_NOISE:
            summary["headline"] += f"; but it is {float(ratio):.1f}x slower at batch {batch} on this CPU"
        summary["headline"] += "."
        summary["edge"] = {"variant": edge["variant"], "runtime": edge["runtime"], "file": file_name(edge)}
    return summary


# ---------------------------------------------------------------- warnings


def is_int8(row: dict[str, Any], variants: dict[str, Any]) -> bool:
    variant = variants.get(row.get("variant"))
    if variant is not None and variant.info.get("mode") in ("dynamic", "static"):
        return True
    return "int8" in str(row.get("variant", ""))


def collect_warnings(rows: list[dict[str, Any]], inputs: ReportInputs) -> list[str]:
    warnings: list[str] = []
    by_key = {(r.get("variant"), r.get("runtime")): r for r in ok_rows(rows)}
    batches = batch_sizes(rows)
    slow_variants: set[str] = set()
    for row in ok_rows(rows):
        parent = by_key.get((row.get("parent"), row.get("runtime")))
        if parent is None:
            continue
        slower = []
        for b in batches:
            mine, theirs = row.get(f"latency_b{b}_p50_ms"), parent.get(f"latency_b{b}_p50_ms")
            if is_number(mine) and is_number(theirs) and float(theirs) > 0:
                ratio = float(mine) / float(theirs)
                int8 = is_int8(row, inputs.variants)
                if (int8 and ratio > 1 + SPEED_NOISE) or ratio > 1 + OTHER_SLOWDOWN:
                    slower.append(f"{fmt_ms(mine)} ms vs {fmt_ms(theirs)} ms at batch {b} ({ratio:.2f}x)")
        if slower:
            kind = "int8 variant" if is_int8(row, inputs.variants) else "variant"
            slow_variants.add(str(row["variant"]))
            warnings.append(
                f"The {kind} `{row['variant']}` is slower than its parent `{row['parent']}` in "
                f"{runtime_label(row['runtime'])}{threads_text(row)}: " + "; ".join(slower) + ". "
                "Do not ship it for speed on this CPU."
            )
    # int8 variants whose quantize stage measured a slow-down but which the benchmark did not time
    for name, variant in inputs.variants.items():
        if variant.metrics.get("slower_than_parent") and name not in slow_variants:
            if any(r.get("variant") == name for r in ok_rows(rows)) and by_key.get(
                (variant.parent, "onnxruntime")
            ):
                continue  # the benchmark timed both and found it not slower: the table is the measurement
            warnings.append(
                f"The int8 variant `{name}` was slower than its parent `{variant.parent}` when the quantize "
                f"stage timed it ({fmt_ms(variant.metrics.get('latency_ms_p50'))} ms vs "
                f"{fmt_ms(variant.metrics.get('fp32_latency_ms_p50'))} ms at batch "
                f"{variant.metrics.get('latency_batch')})."
            )
    for row in rows:
        status = row.get("status", "ok")
        if status == "export_failed":
            warnings.append(
                f"Exporting `{row['variant']}` for {runtime_label(row['runtime'])} failed: "
                f"{row.get('error') or 'no reason given'}. That file is not shipped or measured."
            )
        elif status not in (None, "ok"):
            warnings.append(
                f"Measuring `{row['variant']}` in {runtime_label(row['runtime'])} failed: "
                f"{row.get('error') or status}."
            )
        elif row.get("export_ok") is False:
            agreement = row.get("parity_top1_agreement")
            warnings.append(
                f"The parity check of `{row['variant']}` in {runtime_label(row['runtime'])} failed: its "
                f"outputs differ from the PyTorch model (max |diff| {row.get('parity_max_abs_diff')}, "
                "top-1 agreement "
                f"{fmt_pct(agreement) if is_number(agreement) else 'unknown'})."
            )
    measured_exports = {(r.get("variant"), r.get("runtime")) for r in rows}
    runtime_of = {"onnx": "onnxruntime", "torchscript": "torchscript"}
    for stage in inputs.stages:
        if stage["kind"] == "export":
            for name, report in (stage["metrics"].get("variants") or {}).items():
                for fmt, entry in (report.get("files") or {}).items():
                    if not entry.get("ok") and (name, runtime_of.get(fmt, fmt)) not in measured_exports:
                        warnings.append(f"Exporting `{name}` to {fmt} failed: {entry.get('error')}.")
        if stage["kind"] == "gates":
            warnings.extend(gate_failures(stage["metrics"]))
    if not any(r.get("variant") == inputs.baseline for r in ok_rows(rows)) and rows:
        warnings.append(
            f"The baseline `{inputs.baseline}` has no successful measurement, so accuracy deltas and "
            "ratios are missing."
        )
    return warnings


def gate_failures(metrics: dict[str, Any]) -> list[str]:
    """Failing gates from a gates stage's metrics, whatever list they are kept in."""
    failures = metrics.get("failures")
    if isinstance(failures, list) and failures:
        return [f"Gate failed: {text}." for text in failures]
    out = []
    for key in ("gates", "results", "checks"):
        entries = metrics.get(key)
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            passed = entry.get("passed", entry.get("ok"))
            if passed is None and "status" in entry:
                passed = str(entry["status"]).lower() in ("pass", "passed", "ok")
            if passed is False:
                what = entry.get("message") or " ".join(
                    str(entry[k]) for k in ("gate", "name", "variant", "value", "threshold") if k in entry
                )
                out.append(f"Gate failed: {what}.")
        if out:
            return out
    failed = metrics.get("failed")
    if is_number(failed) and int(failed) > 0:
        out.append(f"{int(failed)} gate(s) failed; see gates.json.")
    return out


# ---------------------------------------------------------------- charts


def svg_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "compress-report"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chart(fig: Figure, title: str, caption: str, kind: str) -> dict[str, str]:
    return {"title": title, "caption": caption, "uri": svg_uri(fig), "kind": kind}


def new_figure(width: float = 7.5, height: float = 4.2) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    return fig, ax


MARKERS = {"pytorch": "o", "torchscript": "s", "onnxruntime": "^"}


def colors_for(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    names = list(dict.fromkeys(names))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated under (lower x, higher y), ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def scatter_chart(
    rows: list[dict[str, Any]], x_key: str, x_label: str, title: str, caption: str, log_x: bool, inputs
) -> dict[str, str] | None:
    usable = [r for r in ok_rows(rows) if is_number(r.get(x_key)) and float(r[x_key]) > 0][:MAX_CHART_ROWS]
    if not usable:
        return None
    colors = colors_for(r["variant"] for r in usable)
    fig, ax = new_figure()
    points = [(float(r[x_key]), 100 * float(r["accuracy"])) for r in usable]
    for row, (x, y) in zip(usable, points, strict=True):
        ax.scatter(
            x, y, color=colors[row["variant"]], marker=MARKERS.get(row["runtime"], "D"), s=46, zorder=3
        )
    front = pareto_front(points)
    fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
    ax.step(fx, fy, where="post", color="#444", lw=1, ls="--", zorder=2, label="Pareto front")
    ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="#222", lw=1.2, zorder=4)
    bases = [p for r, p in zip(usable, points, strict=True) if r["variant"] == inputs.baseline]
    if bases:
        floor = max(y for _, y in bases) - inputs.tolerance_pp
        ax.axhline(floor, color="#c0392b", lw=0.8, ls=":", label=f"baseline − {inputs.tolerance_pp:g} pp")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy (%)")
    handles = [Line2D([], [], color=colors[v], marker="o", ls="", label=v) for v in colors]
    handles += [
        Line2D([], [], color="#777", marker=MARKERS.get(rt, "D"), ls="", label=runtime_label(rt))
        for rt in dict.fromkeys(r["runtime"] for r in usable)
    ]
    ax.legend(
        handles=handles + list(ax.get_lines()),
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        frameon=False,
    )
    return chart(fig, title, caption, "scatter")


def size_bars(rows: list[dict[str, Any]]) -> dict[str, str] | None:
    usable = [r for r in ok_rows(rows) if is_number(r.get("size_bytes"))]
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for row in usable:  # one bar per shipped file: pytorch and torchscript rows are different files
        seen.setdefault((row["variant"], row.get("format") or row["runtime"]), row)
    bars = list(seen.values())[:MAX_CHART_ROWS]
    if not bars:
        return None
    fig, ax = new_figure(7.5, 0.9 + 0.28 * len(bars))
    labels = [f"{r['variant']} ({r.get('format') or r['runtime']})" for r in bars]
    y = list(range(len(bars)))
    kib = [float(r["size_bytes"]) / 1024 for r in bars]
    gz = [float(r["gzip_bytes"]) / 1024 if is_number(r.get("gzip_bytes")) else 0.0 for r in bars]
    ax.barh([i + 0.2 for i in y], kib, height=0.4, color="#4878a8", label="on disk")
    ax.barh([i - 0.2 for i in y], gz, height=0.4, color="#e0a040", label="gzip -9")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KiB")
    ax.legend(fontsize=8, loc="lower right")
    return chart(fig, "File size per variant", "Bytes on disk and gzip-compressed, per shipped file.", "bars")


def history_chart(curves: dict[str, list[dict[str, Any]]]) -> dict[str, str] | None:
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    colors = colors_for(curves)
    for name, rows in curves.items():
        x = list(range(1, len(rows) + 1))
        val = [100 * r["val_accuracy"] if is_number(r.get("val_accuracy")) else math.nan for r in rows]
        loss = [r.get("train_loss", math.nan) for r in rows]
        style = {"color": colors[name], "marker": "o", "ms": 3, "lw": 1.2, "label": name}
        left.plot(x, val, **style)
        right.plot(x, [v if is_number(v) else math.nan for v in loss], **style)
    left.set_title("validation accuracy (%)", fontsize=10)
    right.set_title("training loss", fontsize=10)
    longest = max(len(rows) for rows in curves.values())
    for ax in (left, right):
        ax.set_xlim(0.5, longest + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (fine-tuning epochs continue the count)")
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return chart(
        fig,
        "Training and fine-tuning curves",
        "Per epoch of each stage that trained or fine-tuned a model (validation split only).",
        "curves",
    )


def sparsity_chart(per_layer: dict[str, dict[str, float]]) -> dict[str, str] | None:
    per_layer = {k: v for k, v in per_layer.items() if v}
    if not per_layer:
        return None
    layers = list(dict.fromkeys(layer for v in per_layer.values() for layer in v))
    fig, ax = new_figure(7.5, 1.0 + 0.35 * len(layers) * max(1, len(per_layer)) ** 0.5)
    width = 0.8 / len(per_layer)
    colors = colors_for(per_layer)
    for k, (name, values) in enumerate(per_layer.items()):
        y = [i - 0.4 + width * (k + 0.5) for i in range(len(layers))]
        ax.barh(
            y,
            [100 * values.get(layer, 0.0) for layer in layers],
            height=width,
            color=colors[name],
            label=name,
        )
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("zero weights (%)")
    ax.legend(fontsize=8, loc="lower right")
    return chart(fig, "Per-layer sparsity", "Fraction of zero weights in each pruned layer.", "bars")


def sensitivity_chart(tables: dict[str, list[dict[str, Any]]]) -> dict[str, str] | None:
    tables = {k: v for k, v in tables.items() if v}
    if not tables:
        return None
    fig = Figure(figsize=(7.5, 1.2 + 1.6 * len(tables)), dpi=100, layout="constrained")
    axes = fig.subplots(len(tables), 1, squeeze=False)[:, 0]
    for ax, (name, table) in zip(axes, tables.items(), strict=True):
        ranked = sorted(table, key=lambda r: -float(r.get("recovers_pp") or 0))
        ax.barh(
            [r["layer"] for r in ranked], [float(r.get("recovers_pp") or 0) for r in ranked], color="#8e5ea2"
        )
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("validation accuracy recovered by keeping the layer in fp32 (pp)")
    return chart(
        fig,
        "Quantization sensitivity per layer",
        "When int8 lost more than the tolerance, each layer was left in fp32 alone to see how much "
        "accuracy it recovers.",
        "bars",
    )


# ---------------------------------------------------------------- tune (Optuna study)


def study_from(stage: dict[str, Any]) -> dict[str, Any] | None:
    """The study summary of a tune stage: from its metrics or its published study JSON."""
    for source in [stage["metrics"], *stage.get("published", {}).values()]:
        if not isinstance(source, dict):
            continue
        study = source.get("study") if isinstance(source.get("study"), dict) else source
        if isinstance(study.get("trials"), list):
            return study
    return None


def trial_values(trial: dict[str, Any]) -> list[float] | None:
    values = trial.get("values")
    if values is None and "value" in trial:
        values = [trial["value"]]
    if not isinstance(values, list) or not values or not all(is_number(v) for v in values):
        return None
    return [float(v) for v in values]


def study_charts(label: str, study: dict[str, Any]) -> list[dict[str, str]]:
    trials = [t for t in study["trials"] if isinstance(t, dict)]
    complete = [
        (t, trial_values(t))
        for t in trials
        if str(t.get("state", "COMPLETE")).upper().endswith("COMPLETE") and trial_values(t)
    ]
    charts = []
    objectives = study.get("objectives") or study.get("metric_names") or []
    names = [o.get("metric") if isinstance(o, dict) else o for o in objectives]
    directions = [o.get("direction", "maximize") for o in objectives if isinstance(o, dict)]
    directions = directions or study.get("directions") or [study.get("direction", "maximize")]
    if complete:
        fig, ax = new_figure(7.5, 3.6)
        numbers = [int(t.get("number", i)) for i, (t, _) in enumerate(complete)]
        first = [v[0] for _, v in complete]
        feasible = [t.get("feasible", True) is not False for t, _ in complete]
        ax.scatter(
            [n for n, f in zip(numbers, feasible, strict=True) if f],
            [v for v, f in zip(first, feasible, strict=True) if f],
            color="#4878a8",
            s=22,
            label="feasible trial",
        )
        if not all(feasible):
            ax.scatter(
                [n for n, f in zip(numbers, feasible, strict=True) if not f],
                [v for v, f in zip(first, feasible, strict=True) if not f],
                color="#c0392b",
                marker="x",
                s=26,
                label="infeasible trial",
            )
        maximize = str(directions[0]).lower().startswith("max")
        best, running = [], None
        for v, f in zip(first, feasible, strict=True):
            if f:
                running = v if running is None else (max if maximize else min)(running, v)
            best.append(running if running is not None else math.nan)
        ax.step(numbers, best, where="post", color="#222", lw=1, label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(str(names[0]) if names else "objective")
        ax.legend(fontsize=8)
        charts.append(chart(fig, f"Optuna study ({label}): optimization history", "", "curves"))
    two = [(t, v) for t, v in complete if len(v) >= 2]
    if two:
        fig, ax = new_figure(6.5, 4.0)
        xs, ys = [v[0] for _, v in two], [v[1] for _, v in two]
        ax.scatter(xs, ys, color="#aaa", s=20, label="trial")
        best_numbers = set(study.get("pareto_front") or study.get("best_trials") or [])
        front = [(v[0], v[1]) for t, v in two if t.get("number") in best_numbers]
        if front:
            ax.scatter(*zip(*front, strict=True), color="#c0392b", s=30, label="Pareto front")
        ax.set_xlabel(str(names[0]) if names else "objective 0")
        ax.set_ylabel(str(names[1]) if len(names) > 1 else "objective 1")
        ax.legend(fontsize=8)
        charts.append(chart(fig, f"Optuna study ({label}): Pareto front", "", "scatter"))
    importances = study.get("importances") or study.get("param_importances")
    of = ""
    per_objective = isinstance(importances, dict) and all(isinstance(v, dict) for v in importances.values())
    if importances and per_objective:
        metric, importances = next(iter(importances.items()))  # per objective: show the first
        of = f" for {metric}"
    if isinstance(importances, dict):
        importances = {k: v for k, v in importances.items() if is_number(v)}
    if isinstance(importances, dict) and importances:
        items = sorted(importances.items(), key=lambda kv: -float(kv[1]))
        fig, ax = new_figure(6.5, 0.9 + 0.35 * len(items))
        ax.barh([k for k, _ in items], [float(v) for _, v in items], color="#4878a8")
        ax.invert_yaxis()
        ax.set_xlabel("importance")
        charts.append(chart(fig, f"Optuna study ({label}): parameter importances{of}", "", "bars"))
    return charts


def study_summary(label: str, study: dict[str, Any]) -> dict[str, Any]:
    trials = [t for t in study["trials"] if isinstance(t, dict)]
    states: dict[str, int] = {}
    for t in trials:
        state = str(t.get("state", "COMPLETE")).split(".")[-1].upper()
        states[state] = states.get(state, 0) + 1
    chosen = study.get("chosen") or study.get("best_params") or study.get("best")
    if isinstance(chosen, dict) and "params" in chosen:
        params = ", ".join(
            f"{k}={v:.4g}" if is_number(v) else f"{k}={v}" for k, v in chosen["params"].items()
        )
        chosen = f"trial {chosen.get('number')}: {params}"
    return {
        "label": label,
        "trials": len(trials),
        "states": ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())),
        "chosen": chosen,
        "rule": study.get("selection_rule") or study.get("rule"),
        "target": study.get("target"),
    }


# ---------------------------------------------------------------- distillation


def distillation_rows(stage: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    m = stage["metrics"]
    if "teacher_test_accuracy" not in m:
        return None

    def entry(role: str, name: str | None, acc: Any, std: Any, params: Any, macs: Any) -> dict[str, Any]:
        return {
            "role": role,
            "variant": name or "–",
            "accuracy": fmt_pct(acc),
            "std": f"± {100 * float(std):.2f} pp" if is_number(std) else "",
            "parameters": fmt_int(params),
            "macs": fmt_int(macs),
        }

    student = stage.get("student")
    table = [
        entry(
            "teacher",
            m.get("teacher"),
            m.get("teacher_test_accuracy"),
            None,
            m.get("teacher_parameters"),
            m.get("teacher_macs"),
        ),
        entry(
            "distilled student",
            student,
            m.get("distilled_test_accuracy_mean"),
            m.get("distilled_test_accuracy_std"),
            m.get("student_parameters"),
            m.get("student_macs"),
        ),
    ]
    if "scratch_test_accuracy_mean" in m:
        table.append(
            entry(
                "student from scratch (control)",
                stage.get("scratch"),
                m.get("scratch_test_accuracy_mean"),
                m.get("scratch_test_accuracy_std"),
                m.get("student_parameters"),
                m.get("student_macs"),
            )
        )
    facts = [
        f"{m.get('seeds', 1)} seed(s), temperature {m.get('temperature')}, alpha {m.get('alpha')}, "
        f"{m.get('epochs')} epoch(s) each"
    ]
    if is_number(m.get("parameter_ratio")):
        facts.append(
            f"The student has {1 / float(m['parameter_ratio']):.1f}x fewer parameters than the teacher."
        )
    if is_number(m.get("gain")):
        facts.append(f"Distillation versus scratch: {100 * float(m['gain']):+.2f} pp test accuracy.")
    if is_number(m.get("gap_closed")):
        facts.append(
            f"It closes {100 * float(m['gap_closed']):.0f} % of the gap between the scratch student "
            "and the teacher."
        )
    if m.get("verdict"):
        facts.append(f"Verdict: {m['verdict']}.")
    return {"label": stage["label"], "rows": table, "facts": facts}


# ---------------------------------------------------------------- versus the previous run

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
        (f"latency_b{b}_p50_ms", f"p50 latency b{b} (ms)", "ms", LATENCY_NOISE) for b in batch_sizes(rows)
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


# ---------------------------------------------------------------- provenance


def provenance(inputs: ReportInputs, rows: list[dict[str, Any]]) -> dict[str, Any]:
    m = inputs.manifest
    threads = sorted({int(r["threads"]) for r in rows if is_number(r.get("threads"))})
    cpu = next((r["cpu_model"] for r in rows if r.get("cpu_model")), None) or m.get("cpu_model")
    facts = [
        ("Pipeline", f"{m.get('pipeline', '?')} ({m.get('pipeline_file', '?')})"),
        ("Run id", m.get("run_id", "?")),
        ("Started", m.get("started", "?")),
        ("Command", m.get("command", "?")),
        ("Seed", m.get("seed", "?")),
        ("Device", f"{m.get('device', '?')} ({m.get('device_name', '?')})"),
        ("CPU model", cpu or "?"),
        ("Benchmark threads", ", ".join(map(str, threads)) or "–"),
        ("Torch threads at start", m.get("threads", "?")),
        ("Data", ", ".join(f"{k}={v}" for k, v in (m.get("data") or {}).items() if k != "download")),
        ("Results from", inputs.results_source),
    ]
    stages = [
        {
            "name": s.get("name"),
            "stage": s.get("stage"),
            "status": s.get("status"),
            "seconds": fmt_float(s.get("seconds"), 2),
            "key": str(s.get("cache_key", ""))[:16],
        }
        for s in m.get("stages", [])
    ]
    hits = sum(1 for s in stages if s["status"] == "cached")
    return {
        "facts": [{"name": k, "value": str(v)} for k, v in facts],
        "versions": [{"name": k, "value": v} for k, v in (m.get("versions") or {}).items()],
        "stages": stages,
        "cache_hits": f"{hits} of {len(stages)} earlier stage(s) reused from the cache",
        "yaml": inputs.resolved_yaml,
    }


# ---------------------------------------------------------------- the page


def build_page(inputs: ReportInputs) -> dict[str, Any]:
    rows = [dict(r) for r in inputs.results]
    batches = batch_sizes(rows)
    batch = inputs.latency_batch if inputs.latency_batch in batches else (batches[-1] if batches else None)
    columns = table_columns(batches)
    charts: list[dict[str, str]] = []
    if batch is not None and inputs.charts:
        found = scatter_chart(
            rows,
            f"latency_b{batch}_p50_ms",
            f"p50 latency at batch {batch} (ms, log scale)",
            f"Accuracy vs latency (batch {batch})",
            "Each point is a variant in one runtime (marker). Ringed points form the Pareto front: "
            "no other point is both faster and more accurate.",
            True,
            inputs,
        )
        charts += [found] if found else []
    found = inputs.charts and scatter_chart(
        rows,
        "size_bytes",
        "file size (bytes, log scale)",
        "Accuracy vs file size",
        "Ringed points form the Pareto front of size against accuracy.",
        True,
        inputs,
    )
    charts += [found] if found else []
    found = inputs.charts and size_bars(rows)
    charts += [found] if found else []

    curves: dict[str, list[dict[str, Any]]] = {}
    per_layer: dict[str, dict[str, float]] = {}
    structured: list[dict[str, Any]] = []
    sensitivity: dict[str, list[dict[str, Any]]] = {}
    distillation = []
    studies = []
    study_chart_list: list[dict[str, str]] = []
    for stage in inputs.stages:
        metrics = stage["metrics"]
        history = metrics.get("history")
        if isinstance(history, list) and history and isinstance(history[0], dict):
            curves[stage["label"]] = history
        for name, extra in (stage.get("curves") or {}).items():
            curves[f"{stage['label']}: {name}"] = extra
        for published in (stage.get("published") or {}).values():
            if isinstance(published, dict) and isinstance(published.get("variants"), dict):
                for name, record in published["variants"].items():
                    if isinstance(record, dict) and record.get("sensitivity"):
                        sensitivity[name] = record["sensitivity"]
        if stage["kind"] == "distill":
            found = distillation_rows(stage, rows)
            if found:
                distillation.append(found)
        if stage["kind"] == "tune":
            study = study_from(stage)
            if study is not None:
                studies.append(study_summary(stage["label"], study))
                study_chart_list += study_charts(stage["label"], study) if inputs.charts else []
    for name, variant in inputs.variants.items():
        layers = variant.info.get("per_layer_sparsity")
        if isinstance(layers, dict) and layers:
            per_layer[name] = {k: float(v) for k, v in layers.items() if is_number(v)}
        shapes = variant.info.get("layer_shapes")
        if isinstance(shapes, dict) and shapes:
            structured.append(
                {
                    "variant": name,
                    "layers": [{"name": k, "shape": " x ".join(map(str, v))} for k, v in shapes.items()],
                }
            )
    if inputs.charts:
        for found in (history_chart(curves), sparsity_chart(per_layer), sensitivity_chart(sensitivity)):
            charts += [found] if found else []
    charts += study_chart_list

    m = inputs.manifest
    return {
        "title": inputs.title or f"Compression report: {m.get('pipeline', 'pipeline')}",
        "run_id": m.get("run_id", "?"),
        "pipeline": m.get("pipeline", "?"),
        "summary": summarize(rows, inputs, batch),
        "warnings": collect_warnings(rows, inputs),
        "columns": columns,
        "rows": table_rows(rows, columns, inputs.tolerance_pp),
        "variants": list(dict.fromkeys(r.get("variant") for r in rows)),
        "results": rows,
        "charts": charts,
        "structured": structured,
        "distillation": distillation,
        "studies": studies,
        "previous": compare_previous(rows, inputs.previous),
        "provenance": provenance(inputs, rows),
        "tolerance_pp": inputs.tolerance_pp,
        "results_source": inputs.results_source,
    }


# ---------------------------------------------------------------- rendering


def code_spans(text: str) -> markupsafe.Markup:
    """Escape ``text`` and turn `backticks` into <code> elements."""
    escaped = str(markupsafe.escape(text))
    return markupsafe.Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["code"] = code_spans
    return env


def render_html(page: dict[str, Any]) -> str:
    return environment().get_template("report.html.j2").render(page=page)


MARKDOWN_COLUMNS = ("variant", "runtime", "accuracy", "accuracy_delta_pp", "size_bytes", "size_ratio")


def render_markdown(page: dict[str, Any]) -> str:
    s = page["summary"]
    lines = [f"# {page['title']}", "", f"Run `{page['run_id']}`.", ""]
    lines += [f"**{s['headline']}**", ""] if s.get("headline") else []
    if s.get("baseline"):
        lines += [s["baseline"], ""]
    if s["recommendations"]:
        lines += [f"Within {s['tolerance_pp']:g} pp of the baseline's accuracy:", ""]
        labels = {"smallest": "Smallest", "fastest": "Fastest", "most_accurate": "Most accurate"}
        lines += [f"- **{labels[r['objective']]}:** {r['sentence']}" for r in s["recommendations"]]
        lines.append("")
    if page["warnings"]:
        lines += ["## Warnings", ""] + [f"- ⚠ {w}" for w in page["warnings"]] + [""]
    batches = batch_sizes(page["results"])
    keys = list(MARKDOWN_COLUMNS)
    for b in batches:
        keys += [f"latency_b{b}_p50_ms", f"latency_ratio_b{b}"]
    keys.append("status")
    columns = [c for c in page["columns"] if c["key"] in keys]
    lines += ["## Results", ""]
    lines.append("| " + " | ".join(c["label"] for c in columns) + " |")
    lines.append("|" + "|".join("---" if c["kind"] == "text" else "---:" for c in columns) + "|")
    for row in page["results"]:
        cells = [FORMATTERS[c["kind"]](row.get(c["key"])).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios are against the baseline in the same runtime; lower is better for size and latency.",
        "",
    ]
    return "\n".join(lines)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame -> JSON-like rows with NaN as None (what results.json holds)."""
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in frame.to_dict(orient="records")
    ]
