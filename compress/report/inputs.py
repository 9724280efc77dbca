"""What the report is built from: :class:`ReportInputs`, gathered by the report stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compress.results import Predictions, row_key


@dataclass
class ReportInputs:
    """What the report is built from; the report stage gathers it from the run context."""

    results: list[dict[str, Any]]  # the rows of the results table shown (compress.results)
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
    # the benchmark's kept top-1 predictions (``predictions_data``); None: not recorded
    predictions: dict[str, Any] | None = None


def predictions_data(predictions: Predictions, keys: set[tuple[str, str]] | None = None) -> dict[str, Any]:
    """A :class:`compress.results.Predictions` as plain lists, the rows limited to
    ``keys`` ((variant, runtime) pairs): ``{"labels", "classes", "rows": {"variant@runtime": [...]}}``.
    Plain data, so the inputs of a report can be recorded as JSON and rebuilt (the snapshot test)."""
    wanted = None if keys is None else {row_key(v, rt) for v, rt in keys}
    return {
        "labels": predictions.labels.astype(int).tolist(),
        "classes": [str(c) for c in predictions.classes],
        "rows": {
            key: values.astype(int).tolist()
            for key, values in predictions.rows.items()
            if wanted is None or key in wanted
        },
    }
