"""Stage ``report``: one self-contained HTML page that says which variant to ship and why.

It runs after the benchmark and reads, through the run context (never another stage's
directory): every variant, every earlier stage's ``StageResult`` (``ctx.results``; the
benchmark's results table is its declared output ``table``, see ``compress.results``), the
files those stages publish (``ctx.published``, read where each stage wrote them; e.g. the
quantize stage's sensitivity tables), the run manifest (``ctx.manifest``), and from
``reports/<pipeline>/`` only the previous run's ``report.json`` (``ctx.reports_dir``).
The content is built in ``compress.report``.

The benchmark's kept predictions (``predictions.npz``, beside its ``results.json``) come with
its table, for the confusion change of the recommended variant; a benchmark that kept none
leaves that section one line saying so.

Writes (published under ``reports/<pipeline>/``): ``latest.html`` and ``<run-id>.html``,
``summary.md`` (summary + table in Markdown, for CI job summaries), and ``report.json`` (the
rows this page shows; the next run reads it for "versus the previous run"). When no benchmark
stage ran, a results table with the same columns is made from the variants' own metrics and
written (``results.csv``/``results.json``), and declared as this stage's ``table``.

The stage is registered with ``needs_results=True``: the page shows per-run facts (run id,
timings, cache hits, the comparison with the previous run), so its cache key includes the run
id and it is rebuilt on every run; it therefore always reflects the current upstream results.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from compress import faults
from compress.config import StageConfig
from compress.context import Context
from compress.errors import ArtifactError
from compress.fileio import read_json, write_json, write_text
from compress.results import RESULTS_JSON, ResultsTable, TableError, predictions_beside
from compress.stages import stage
from compress.variants import StageResult, Variant

PREVIOUS = "report.json"


class ReportConfig(StageConfig):
    """An HTML report with the recommendation, the comparison table and the charts."""

    stage: Literal["report"] = Field(description="Writes the HTML report and summary.md.")
    tolerance_pp: float = Field(
        1.0, ge=0, le=100, description="Accuracy loss (percentage points) a recommended variant may have."
    )
    baseline: str | None = Field(None, description="The reference variant; null: the benchmark's baseline.")
    latency_batch: int | None = Field(
        None,
        gt=0,
        le=65536,
        description="Batch size for 'fastest' and quoted speed-ups; null: the largest benchmarked.",
    )
    title: str | None = Field(
        None, max_length=200, description="Page title; null: 'Compression report: <pipeline>'."
    )

    def consumes(self, available: list[str]) -> list[str]:
        names = list(self.from_) if self.from_ is not None else list(available)
        if not names:
            raise ValueError("from: no earlier stage produces a variant to report on")
        return names


@stage("report", ReportConfig, version=1, needs_data=False, needs_results=True)
def run(cfg: ReportConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    from compress import report as reporting  # matplotlib and jinja2: only when a report is built

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = {s.label: s.stage for s in ctx.pipeline.stages}
    stages = [
        _stage_view(label, kinds.get(label, label), result, ctx.published.get(label, {}))
        for label, result in ctx.results.items()
    ]

    benchmark = next((s for s in reversed(stages) if s["kind"] == "benchmark"), None)
    table, source = _results(cfg, inputs, benchmark, ctx)
    publish = table.save(out_dir) if benchmark is None else {}  # without a benchmark: made here
    rows = table.only(v.name for v in inputs)
    predictions = _predictions(table, rows)

    baseline = cfg.baseline or (benchmark["metrics"].get("baseline") if benchmark else None) or "baseline"
    previous = _read_previous(ctx.reports_dir, ctx)
    inputs_view = reporting.ReportInputs(
        results=rows,
        variants={v.name: v for v in inputs},
        stages=stages,
        manifest=ctx.manifest,
        previous=previous,
        resolved_yaml=_resolved_yaml(ctx),
        tolerance_pp=cfg.tolerance_pp,
        baseline=baseline,
        latency_batch=cfg.latency_batch,
        title=cfg.title,
        results_source=source,
        predictions=predictions,
    )
    page = reporting.build_page(inputs_view)
    html = reporting.render_html(page)
    publish.update(_write_pages(page, html, rows, ctx, out_dir))
    seconds = time.perf_counter() - started
    ctx.log.info(
        "report: %d rows, %d charts, %d warning(s), %.0f KiB HTML in %.1fs",
        len(rows),
        len(page["charts"]),
        len(page["warnings"]),
        len(html.encode()) / 1024,
        seconds,
    )
    metrics: dict[str, Any] = {
        "rows": len(rows),
        "charts": len(page["charts"]),
        "warnings": page["warnings"],
        "headline": page["summary"].get("headline"),
        "recommendations": {r["objective"]: r["variant"] for r in page["summary"]["recommendations"]},
        "html_bytes": len(html.encode()),
        "previous_run": previous.get("run_id") if previous else None,
        "seconds": round(seconds, 2),
    }
    made = out_dir / RESULTS_JSON if benchmark is None else None
    return StageResult(metrics=metrics, publish=publish, table=made)


def _results(
    cfg: ReportConfig, inputs: list[Variant], benchmark: dict | None, ctx: Context
) -> tuple[ResultsTable, str]:
    """The results table and where it came from: the benchmark's (its declared output), or,
    without a benchmark, one made from the variants' own metrics."""
    if benchmark is None:
        rows = _rows_from_variants(inputs, cfg.baseline or "baseline")
        return ResultsTable.of(rows), "variants' own metrics"
    path = ctx.results[benchmark["label"]].table
    if path is None:
        raise ArtifactError(f"stage report: the benchmark stage {benchmark['label']!r} left no results table")
    try:
        table = ResultsTable.load(path)
        table.predictions = predictions_beside(path)
    except TableError as exc:
        raise ArtifactError(f"stage report: {exc}") from None
    except ValueError as exc:  # an unreadable predictions.npz: the table still reports
        ctx.log.warning("report: %s; the confusion change is left out", exc)
    return table, f"benchmark stage `{benchmark['label']}`"


def _write_pages(
    page: dict, html: str, rows: list[dict[str, Any]], ctx: Context, out_dir: Path
) -> dict[str, str]:
    """The page as latest.html and <run-id>.html, summary.md, and the rows the next run compares
    with; returns what to publish."""
    from compress import report as reporting

    write_text(out_dir / "latest.html", html)
    write_text(out_dir / f"{ctx.run_id}.html", html)
    faults.checkpoint("report:writing")
    write_text(out_dir / "summary.md", reporting.render_markdown(page))
    write_json(out_dir / PREVIOUS, {"run_id": ctx.run_id, "pipeline": ctx.pipeline.name, "results": rows})
    names = ("latest.html", f"{ctx.run_id}.html", "summary.md", PREVIOUS)
    return {name: name for name in names}


def _stage_view(label: str, kind: str, result: StageResult, files: dict[str, Path]) -> dict[str, Any]:
    """What the report needs of one earlier stage: its metrics, published JSON and curves.

    ``files`` are the stage's declared published files (``ctx.published``), read where the
    stage wrote them, so a report never depends on what an earlier run left in reports/."""
    published: dict[str, Any] = {}
    for target, path in files.items():
        if target.endswith(".json") and path.is_file() and target != "results.json":
            try:
                published[target] = read_json(path)
            except (OSError, ValueError):
                continue
    curves: dict[str, list[dict[str, Any]]] = {}
    if "history" not in result.metrics:
        for variant in result.variants:  # e.g. distill: one training history per student
            relative = variant.info.get("curves")
            path = Path(variant.file).parent / relative if isinstance(relative, str) else None
            if path is not None and path.is_file():
                try:
                    data = read_json(path)
                except (OSError, ValueError):
                    continue
                if isinstance(data, list):
                    curves[variant.name] = data
    view = {
        "label": label,
        "kind": kind,
        "metrics": result.metrics,
        "publish": result.publish,
        "published": published,
        "curves": curves,
    }
    if kind == "distill":
        view["student"] = next((v.name for v in result.variants if not v.info.get("control_for")), None)
        view["scratch"] = next((v.name for v in result.variants if v.info.get("control_for")), None)
    return view


def _predictions(table: ResultsTable, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The top-1 predictions the benchmark kept with its table, limited to the rows shown; None
    when it kept none (an older benchmark) or they were unreadable."""
    from compress.report.inputs import predictions_data

    if table.predictions is None:
        return None
    return predictions_data(table.predictions, {(str(r.get("variant")), str(r.get("runtime"))) for r in rows})


def _rows_from_variants(inputs: list[Variant], baseline: str) -> list[dict[str, Any]]:
    """Without a benchmark: one row per variant from what its own stage measured."""
    base = next((v for v in inputs if v.name == baseline), None)
    rows = []
    for v in inputs:
        size = Path(v.file).stat().st_size if Path(v.file).is_file() else None
        acc = v.metrics.get("test_accuracy")
        row = {
            "variant": v.name,
            "runtime": "pytorch" if v.format == "torch" else v.format,
            "format": v.format,
            "parent": v.parent,
            "stage": v.stage,
            "is_baseline": v.name == baseline,
            "status": "ok" if acc is not None else "not measured",
            "file": Path(v.file).name,
            "accuracy": acc,
            "parameters": v.metrics.get("parameters"),
            "nonzero_parameters": v.metrics.get("nonzero_parameters"),
            "sparsity": v.metrics.get("sparsity"),
            "macs": v.metrics.get("macs"),
            "size_bytes": size,
        }
        if base is not None and acc is not None and base.metrics.get("test_accuracy") is not None:
            row["accuracy_delta_pp"] = 100 * (acc - base.metrics["test_accuracy"])
        base_size = Path(base.file).stat().st_size if base is not None and Path(base.file).is_file() else None
        if size and base_size:
            row["size_ratio"] = size / base_size
        rows.append(row)
    return rows


def _read_previous(reports_dir: Path | None, ctx: Context) -> dict[str, Any] | None:
    """The rows the previous report of this pipeline showed (its report.json), if any."""
    path = reports_dir / PREVIOUS if reports_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        ctx.log.warning("report: %s is unreadable; no comparison with the previous run", path)
        return None
    if not isinstance(data, dict) or data.get("run_id") == ctx.run_id:
        return None
    return data


def _resolved_yaml(ctx: Context) -> str:
    path = ctx.run_dir / "config.yaml"  # the engine writes the resolved config there first
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""
