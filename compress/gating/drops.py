"""The check's drops: the accuracy drop and every class's drop, with the interval when paired.

``decide`` says which number meets the limit: ``estimate`` (the measured drop), ``lower`` (the
interval's lower end: fail only when the drop is significantly beyond the limit) or ``upper``
(the upper end: pass only when the drop is significantly within it). Without an interval
(no predictions on one side, or another test set) every mode decides on the estimate. The
messages are ``judge``'s, as in the gates stage:

    accuracy drop 0.21 pp (95 % CI 0.05 to 0.37) > max 0.20 pp (reference 98.20% -> 97.99%; ...)
    class '3' drop 6.63 pp (95 % CI 5.17 to 8.29) > max 5.00 pp (reference 95.45% -> 88.81% on ...)
    class '3' drop 6.63 pp (95 % CI 5.17 to 8.29): lower end 5.17 pp > max 5.00 pp, significantly beyond
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.gating.numbers import Row, number, pp
from compress.gating.outcome import FAILED, Interval, Outcome, judge
from compress.gating.rules import ESTIMATE, MetricDef
from compress.measure.paired import PairedStats

CHECK_DROP = MetricDef(
    "accuracy_drop", "<=", True, "accuracy drop", pp, "pp lost against the reference", interval=True
)
CHECK_CLASS = MetricDef(
    "class_drop", "<=", True, "class drop", pp, "pp lost on one class against the reference", interval=True
)


@dataclass(frozen=True)
class Drop:
    """A drop in percentage points (positive = worse) and its interval when paired data allow."""

    estimate: float
    low: float | None = None
    high: float | None = None
    detail: str = ""  # appended to the message, e.g. " (reference 95.45% -> 88.81% on its 1,010 images)"

    def decided(self, decide: str) -> float:
        """The number that meets the limit under ``decide``."""
        if self.low is None or self.high is None:
            return self.estimate
        return Interval(self.low, self.high, 0.0).decides(self.estimate, decide)


def judge_drop(
    gate: str,
    metric: MetricDef,
    row: Row,
    drop: Drop,
    limit: float,
    decide: str,
    confidence: float,
    what: str | None = None,
    detail: str = "",
) -> Outcome:
    """One drop against its limit (decided on the estimate when it has no interval)."""
    interval = None
    if drop.low is not None and drop.high is not None:
        interval = Interval(drop.low, drop.high, confidence)
    return judge(
        gate,
        metric,
        row,
        drop.estimate,
        limit,
        "reference",
        detail,
        interval=interval,
        decide=decide if interval is not None else ESTIMATE,
        what=what,
    )


def class_drops(new: Row, old: Row, stats: PairedStats | None) -> dict[str, Drop]:
    """Every class's drop: from the predictions (with the interval) when paired, else from both
    rows' ``per_class_accuracy`` (classes either side did not measure are left out)."""
    if stats is not None:
        return {
            name: Drop(c.drop_pp, c.ci_low_pp, c.ci_high_pp, _detail(c.reference, c.accuracy, c.images))
            for name, c in stats.classes.items()
        }
    ours, theirs = new.get("per_class_accuracy"), old.get("per_class_accuracy")
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        return {}
    drops = {}
    for name, before in theirs.items():
        a, b = number(before), number(ours.get(name))
        if a is not None and b is not None:
            drops[str(name)] = Drop(100.0 * (a - b), detail=_detail(a, b))
    return drops


def _detail(reference: float, accuracy: float, images: int | None = None) -> str:
    on = f" on its {images:,} images" if images is not None else ""
    return f" (reference {100 * reference:.2f}% -> {100 * accuracy:.2f}%{on})"


def judge_classes(
    row: Row, drops: dict[str, Drop], limit: float, decide: str, confidence: float
) -> Outcome | None:
    """One outcome for a row's classes: every class beyond the limit (worst first) when any is,
    else the class closest to it. None when no class was measured on both sides."""
    if not drops:
        return None
    ranked = sorted(drops, key=lambda name: drops[name].decided(decide), reverse=True)
    judged = [
        judge_drop(
            "class",
            CHECK_CLASS,
            row,
            drops[name],
            limit,
            decide,
            confidence,
            f"class {name!r} drop",
            drops[name].detail,
        )
        for name in ranked
    ]
    failing = [o for o in judged if o.status == FAILED]
    if not failing:
        return judged[0]
    first = failing[0]
    first.message = "; ".join(o.message for o in failing)
    return first


def flips_text(stats: PairedStats) -> str:
    """``31 flips (3.1 %): 12 fixed, 14 broken`` (the rest changed from one wrong class to another)."""
    return f"{stats.flips} flips ({100 * stats.flip_rate:.1f} %): {stats.fixed} fixed, {stats.broken} broken"
