"""The page as one plain dict: every section built from the report's inputs.

Everything here is a view over the benchmark's results table (one row per variant and
runtime) plus what the other stages reported (``StageResult.metrics``, variant ``info``, their
published JSON files) and the run manifest. ``build_page`` turns those into one plain dict;
``compress.report.render`` only formats it, so the HTML page and ``summary.md`` always say the
same thing. A section appears only when its data exists (e.g. no pruned variant, no per-layer
chart).
"""

from __future__ import annotations

from typing import Any

from compress.gating.numbers import latency_batch_sizes
from compress.report.alerts import collect_warnings, gate_report
from compress.report.charts import (
    history_chart,
    layer_sensitivity_chart,
    pruning_sensitivity_chart,
    runtime_bars,
    scatter_chart,
    sensitivity_chart,
    size_bars,
    sparsity_chart,
)
from compress.report.classes import class_delta_chart, confusion_section
from compress.report.distillation import distillation_rows
from compress.report.formatting import is_number
from compress.report.inputs import ReportInputs
from compress.report.previous import compare_previous
from compress.report.provenance import provenance
from compress.report.quantization import qat_rows
from compress.report.study import search_charts, study_charts, study_from, study_summary
from compress.report.summary import summarize
from compress.report.table import table_columns, table_rows


def build_page(inputs: ReportInputs) -> dict[str, Any]:
    rows = [dict(r) for r in inputs.results]
    batches = latency_batch_sizes(rows)
    batch = inputs.latency_batch if inputs.latency_batch in batches else (batches[-1] if batches else None)
    columns = table_columns(batches, rows)
    charts = _result_charts(rows, inputs, batch, batches)
    sections = _stage_sections(inputs, rows)
    m = inputs.manifest
    summary = summarize(rows, inputs, batch)
    return {
        "title": inputs.title or f"Compression report: {m.get('pipeline', 'pipeline')}",
        "run_id": m.get("run_id", "?"),
        "pipeline": m.get("pipeline", "?"),
        "summary": summary,
        "gates": gate_report(inputs.stages),
        "warnings": collect_warnings(rows, inputs),
        "confusion": confusion_section(rows, summary, inputs.predictions, inputs.baseline),
        "columns": columns,
        "rows": table_rows(rows, columns, inputs.tolerance_pp),
        "variants": list(dict.fromkeys(r.get("variant") for r in rows)),
        "results": rows,
        "charts": charts + sections["charts"],
        "structured": sections["structured"],
        "distillation": sections["distillation"],
        "qat": qat_rows(inputs.variants),
        "studies": sections["studies"],
        "previous": compare_previous(rows, inputs.previous),
        "provenance": provenance(inputs, rows),
        "tolerance_pp": inputs.tolerance_pp,
        "results_source": inputs.results_source,
    }


def _result_charts(
    rows: list[dict[str, Any]], inputs: ReportInputs, batch: int | None, batches: list[int]
) -> list[dict[str, str]]:
    """The charts of the results table: accuracy against latency and size, sizes, latency per
    runtime, the per-class accuracy change."""
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
    for size in batches if inputs.charts else []:
        found = runtime_bars(rows, size)
        charts += [found] if found else []
    found = inputs.charts and class_delta_chart(rows, inputs.baseline)
    charts += [found] if found else []
    return charts


def _stage_sections(inputs: ReportInputs, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the other stages recorded: their charts (curves, sparsity, sensitivities, studies),
    the structurally pruned layer shapes, the distillation and tuning sections."""
    charts: list[dict[str, str]] = []
    curves: dict[str, list[dict[str, Any]]] = {}
    per_layer: dict[str, dict[str, float]] = {}
    structured: list[dict[str, Any]] = []
    sensitivity: dict[str, list[dict[str, Any]]] = {}
    layer_drops: dict[str, list[dict[str, Any]]] = {}
    pruning_drops: dict[str, list[dict[str, Any]]] = {}
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
                    if isinstance(record, dict) and record.get("layer_sensitivity"):
                        layer_drops[name] = record["layer_sensitivity"]
        if stage["kind"] == "distill":
            found = distillation_rows(stage, rows)
            if found:
                distillation.append(found)
        if stage["kind"] in ("tune", "search"):
            study = study_from(stage)
            if study is not None:
                studies.append(study_summary(stage["label"], study))
                if inputs.charts:
                    label = stage["label"]
                    study_chart_list += study_charts(label, study) + search_charts(label, study)
    for name, variant in inputs.variants.items():
        layers = variant.info.get("per_layer_sparsity")
        if isinstance(layers, dict) and layers:
            per_layer[name] = {k: float(v) for k, v in layers.items() if is_number(v)}
        if isinstance(variant.info.get("layer_sensitivity"), list):
            pruning_drops[name] = variant.info["layer_sensitivity"]
        shapes = variant.info.get("layer_shapes")
        if isinstance(shapes, dict) and shapes:
            structured.append(
                {
                    "variant": name,
                    "layers": [{"name": k, "shape": " x ".join(map(str, v))} for k, v in shapes.items()],
                }
            )
    if inputs.charts:
        found_charts = (
            history_chart(curves),
            sparsity_chart(per_layer),
            sensitivity_chart(sensitivity),
            layer_sensitivity_chart(layer_drops),
            pruning_sensitivity_chart(pruning_drops),
        )
        for found in found_charts:
            charts += [found] if found else []
    charts += study_chart_list
    return {"charts": charts, "structured": structured, "distillation": distillation, "studies": studies}
