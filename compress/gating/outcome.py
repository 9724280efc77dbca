"""The result of one gate on one row: an :class:`Outcome`, and ``judge``, which makes one.

Every evaluated gate, from the gates stage or from ``compress.check``, is an Outcome (passed,
failed or skipped) whose message holds the measured value and the threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from compress.gating.numbers import Row, passes, shown_pair
from compress.gating.rules import MetricDef

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass
class Outcome:
    gate: str  # rule id (gates) or compared quantity (check)
    metric: str
    variant: str
    runtime: str
    status: str  # passed | failed | skipped
    message: str
    value: float | None = None
    threshold: float | None = None
    op: str | None = None
    against: str | None = None

    @property
    def case(self) -> str:
        return f"{self.variant} [{self.runtime}]" if self.runtime else self.variant

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        """From ``to_json`` output (e.g. a gates stage's metrics); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    return {
        "total": len(outcomes),
        PASSED: sum(o.status == PASSED for o in outcomes),
        FAILED: sum(o.status == FAILED for o in outcomes),
        SKIPPED: sum(o.status == SKIPPED for o in outcomes),
    }


def judge(
    gate: str,
    metric: MetricDef,
    row: Row,
    value: float | None,
    threshold: float,
    against: str | None = None,
    detail: str = "",
    missing: str = "not measured",
) -> Outcome:
    """The one place a measured number meets its threshold."""
    variant, runtime = str(row.get("variant")), str(row.get("runtime") or "")
    base = Outcome(gate, metric.key, variant, runtime, FAILED, "", value, threshold, metric.op, against)
    if value is None:
        base.message = f"{metric.what} {missing}"
        return base
    ok = passes(value, metric.op, threshold)
    shown, limit = shown_pair(value, threshold, metric.fmt)
    bound = "max" if metric.op == "<=" else "min"
    sign = metric.op if ok else (">" if metric.op == "<=" else "<")
    base.status = PASSED if ok else FAILED
    base.message = f"{metric.what} {shown} {sign} {bound} {limit}{detail}"
    return base
