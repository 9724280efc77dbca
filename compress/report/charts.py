"""The matplotlib charts of the results and of the stages' records, as embeddable SVG.

Charts are matplotlib SVGs embedded as ``data:`` URIs in ``<img>`` tags: the page needs no
network and no script library, and each chart is an isolated document (no clashing ids).
The SVG is made reproducible (fixed hash salt, no date) so the same data gives the same bytes.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Iterable
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from compress.report.formatting import is_number, runtime_label
from compress.report.inputs import ReportInputs
from compress.report.table import ok_rows

MAX_CHART_ROWS = 60  # bars/points beyond this make a chart unreadable; the table still has them all
MAX_RUNTIME_VARIANTS = 16  # groups of up to seven bars each in the latency-per-runtime chart


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


MARKERS = {"pytorch": "o", "torchscript": "s", "onnxruntime": "^", "ort": "v", "openvino": "P", "litert": "X"}
MARKERS["executorch"] = "*"


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
    rows: list[dict[str, Any]],
    x_key: str,
    x_label: str,
    title: str,
    caption: str,
    log_x: bool,
    inputs: ReportInputs,
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


def runtime_bars(rows: list[dict[str, Any]], batch: int) -> dict[str, str] | None:
    """p50 latency of each variant in each runtime it ships in, side by side (one bar per runtime)."""
    key = f"latency_b{batch}_p50_ms"
    usable = [r for r in ok_rows(rows) if is_number(r.get(key)) and float(r[key]) > 0]
    runtimes = list(dict.fromkeys(r["runtime"] for r in usable))
    every = list(dict.fromkeys(r["variant"] for r in usable))
    variants = every[:MAX_RUNTIME_VARIANTS]
    if len(runtimes) < 2 or not variants:
        return None
    by = {(r["variant"], r["runtime"]): float(r[key]) for r in usable}
    colors = colors_for(runtimes)
    step = 0.8 / len(runtimes)
    fig, ax = new_figure(7.5, 1.0 + 0.12 * len(variants) * len(runtimes))
    for j, runtime in enumerate(runtimes):
        ys = [i - 0.4 + step * (j + 0.5) for i, v in enumerate(variants) if (v, runtime) in by]
        xs = [by[(v, runtime)] for v in variants if (v, runtime) in by]
        ax.barh(ys, xs, height=step * 0.9, color=colors[runtime], label=runtime_label(runtime))
    ax.set_yticks(range(len(variants)), variants, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"p50 latency at batch {batch} (ms, log scale; shorter is faster)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    caption = (
        "The same files measured in every runtime they ship in, same inputs and threads. LiteRT "
        "models have batch 1, so a batch of N is N invocations; a missing bar is a runtime the "
        "variant does not ship in (int8 ONNX files ship to onnxruntime and OpenVINO only)."
    )
    if len(every) > len(variants):
        caption += f" The first {len(variants)} of {len(every)} variants are shown; the table has all."
    return chart(fig, f"Latency per runtime (batch {batch})", caption, "bars")


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


def layer_sensitivity_chart(tables: dict[str, list[dict[str, Any]]]) -> dict[str, str] | None:
    """Validation drop per layer quantized alone; the layers the fallback kept in fp32 marked."""
    return _drop_bars(
        tables,
        "validation accuracy lost when only this layer is int8 (pp)",
        lambda row: row.get("kept_fp32"),
        ("int8 in the shipped variant", "kept in fp32 by the accuracy fallback"),
        "Per-layer int8 sensitivity",
        "Each weight layer quantized alone (all others fp32), in layer order: the bars say which "
        "layers cost accuracy; orange ones are those the accuracy fallback kept in fp32.",
    )


def pruning_sensitivity_chart(tables: dict[str, list[dict[str, Any]]]) -> dict[str, str] | None:
    """Validation drop per layer magnitude-pruned alone to the stage's sparsity (Distiller's
    sensitivity analysis); the layers global pruning left sparser than that marked."""
    return _drop_bars(
        tables,
        "validation accuracy lost when only this layer is pruned, before fine-tuning (pp)",
        lambda row: (row.get("shipped_sparsity") or 0) < row["sparsity"] - 0.005,
        ("shipped at the target sparsity or more", "shipped less sparse (the global threshold spared it)"),
        "Per-layer pruning sensitivity",
        "Each prunable layer magnitude-pruned alone to the stage's sparsity (all others dense), in "
        "layer order, without fine-tuning: the bars say which layers cannot take that sparsity on "
        "their own; orange ones ended less sparse than the target in the shipped variant.",
    )


def _drop_bars(
    tables: dict[str, list[dict[str, Any]]],
    xlabel: str,
    marked: Callable[[dict[str, Any]], Any],
    legend: tuple[str, str],
    title: str,
    caption: str,
) -> dict[str, str] | None:
    """Horizontal bars of ``drop_pp`` per layer, one panel per variant, ``marked`` rows in orange."""
    tables = {k: v for k, v in tables.items() if v}
    if not tables:
        return None
    fig = Figure(
        figsize=(7.5, 1.2 + 0.25 * sum(len(t) for t in tables.values()) + 0.5 * len(tables)), dpi=100
    )
    fig.set_layout_engine("constrained")
    axes = fig.subplots(len(tables), 1, squeeze=False)[:, 0]
    for ax, (name, table) in zip(axes, tables.items(), strict=True):
        colors = ["#e0a040" if marked(r) else "#4878a8" for r in table]
        ax.barh([r["layer"] for r in table], [float(r.get("drop_pp") or 0) for r in table], color=colors)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    axes[0].legend(
        handles=[
            Line2D([], [], color="#4878a8", lw=6, label=legend[0]),
            Line2D([], [], color="#e0a040", lw=6, label=legend[1]),
        ],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        frameon=False,
    )
    return chart(fig, title, caption, "bars")
