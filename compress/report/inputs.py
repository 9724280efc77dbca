"""What the report is built from: :class:`ReportInputs`, gathered by the report stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
