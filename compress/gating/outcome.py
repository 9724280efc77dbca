"""The result of one gate on one row: an :class:`Outcome`, and ``judge``, which makes one.

Every evaluated gate, from the gates stage or from ``compress.check``, is an Outcome (passed,
failed or skipped) whose message holds the measured value and the threshold. A drop measured on
paired predictions also carries its confidence interval, and a rule can let one end of that
interval decide instead of the estimate (``decide: lower | upper``); the message then says
which end decided.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from compress.gating.numbers import Row, confidence_text, passes, shown_digits, shown_pair
from compress.gating.rules import ESTIMATE, MetricDef

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
LOWER, UPPER = "lower", "upper"  # an end of the interval meets a drop rule's threshold (or ESTIMATE)
DECIDE_MODES = (ESTIMATE, LOWER, UPPER)
# (decision, passed) -> what it means, for a '<=' rule (a drop): which side of the threshold the
# whole interval lies on
_VERDICT = {
    (LOWER, True): "not significantly beyond",
    (LOWER, False): "significantly beyond",
    (UPPER, True): "significantly within",
    (UPPER, False): "not significantly within",
}


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a measured value, in the value's unit (e.g. pp of accuracy drop)."""

    low: float
    high: float
    confidence: float

    def decides(self, value: float, decide: str) -> float:
        """The number that meets the threshold under ``decide``: the estimate or one end."""
        return {ESTIMATE: value, LOWER: self.low, UPPER: self.high}[decide]

    def text(self, digits: int) -> str:
        return f"{confidence_text(self.confidence)} CI {self.low:.{digits}f} to {self.high:.{digits}f}"


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
    # drops measured on paired predictions: the value's interval, its confidence, and what decided
    # (estimate: the value itself; lower / upper: that end of the interval met the threshold)
    ci_low: float | None = None
    ci_high: float | None = None
    confidence: float | None = None
    decide: str | None = None

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
    *,
    interval: Interval | None = None,
    decide: str = ESTIMATE,
    what: str | None = None,
) -> Outcome:
    """The one place a measured number meets its threshold.

    With an ``interval`` the message states it; ``decide`` (lower | upper) lets that end of the
    interval meet the threshold instead of ``value``, and the message says which end decided.
    ``what`` replaces the metric's name in the message (e.g. "class '3' drop").
    """
    variant, runtime = str(row.get("variant")), str(row.get("runtime") or "")
    base = Outcome(gate, metric.key, variant, runtime, FAILED, "", value, threshold, metric.op, against)
    what = what or metric.what
    if value is None:
        base.message = f"{what} {missing}"
        return base
    if decide != ESTIMATE and interval is None:
        raise ValueError(f"decide: {decide} needs the value's interval")
    decided = value
    if interval is not None:
        base.ci_low, base.ci_high, base.confidence, base.decide = (
            interval.low,
            interval.high,
            interval.confidence,
            decide,
        )
        decided = interval.decides(value, decide)
    ok = passes(decided, metric.op, threshold)
    digits = shown_digits(value, threshold, metric.fmt)
    shown, limit = metric.fmt(value, digits), metric.fmt(threshold, digits)
    bound = "max" if metric.op == "<=" else "min"
    sign = metric.op if ok else (">" if metric.op == "<=" else "<")
    ci = f" ({interval.text(digits)})" if interval is not None else ""
    base.status = PASSED if ok else FAILED
    if decide == ESTIMATE:
        base.message = f"{what} {shown}{ci} {sign} {bound} {limit}{detail}"
    else:
        end, limit = shown_pair(decided, threshold, metric.fmt)
        verdict = _VERDICT[(decide, ok)]
        base.message = f"{what} {shown}{ci}: {decide} end {end} {sign} {bound} {limit}, {verdict}{detail}"
    return base
