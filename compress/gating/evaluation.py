"""Gates over one results table: every rule of the gates stage on every row it selects.

Drops and flips are paired: both rows' top-1 predictions on the same images (the benchmark's
``predictions.npz``, a :class:`PairedSource` here) give the drop's interval, each class's drop
and the flips (``compress.measure.paired``). Without them ``max_accuracy_drop`` with
``decide: estimate`` still gates from the table; the rules that need them are skipped, saying why.
"""

from __future__ import annotations

from compress.gating.chance import above_chance_pp, row_num_classes
from compress.gating.numbers import (
    Row,
    accuracy_drop_pp,
    byte_count,
    latency_batch_sizes,
    latency_column,
    number,
    ratio,
)
from compress.gating.outcome import ESTIMATE, FAILED, PASSED, SKIPPED, Interval, Outcome, judge
from compress.gating.rules import EXPORT_RUNTIMES, RUNTIME_NAMES, GateRule, rule_ids, shipped
from compress.measure.paired import PairedStats, compare
from compress.results import Predictions

NO_PREDICTIONS = "the benchmark saved no per-image predictions (predictions.npz)"
_TOLERANCE = 1e-9  # the predictions and the table must give the same accuracy, up to float noise


class PairedSource:
    """The benchmark's per-image predictions, and each (variant, against, runtime) pair's paired
    statistics computed once; or, when there are none, why (``missing``: one line for a skip)."""

    def __init__(self, store: Predictions | None, missing: str = NO_PREDICTIONS) -> None:
        self.store, self.missing = store, missing
        self._stats: dict[tuple[str, str, str, float], PairedStats | str] = {}

    def stats(self, row: Row, against: Row, confidence: float) -> PairedStats | str:
        """The row against the other row of its runtime, or the reason they cannot be paired."""
        variant, reference, runtime = str(row["variant"]), str(against["variant"]), str(row["runtime"])
        key = (variant, reference, runtime, confidence)
        if key not in self._stats:
            self._stats[key] = self._compute(row, against, confidence)
        return self._stats[key]

    def _compute(self, row: Row, against: Row, confidence: float) -> PairedStats | str:
        if self.store is None:
            return self.missing
        runtime = str(row["runtime"])
        ours = self.store.get(str(row["variant"]), runtime)
        theirs = self.store.get(str(against["variant"]), runtime)
        if ours is None or theirs is None:
            absent = row["variant"] if ours is None else against["variant"]
            return f"no predictions of {absent} [{runtime}] in predictions.npz"
        try:
            stats = compare(ours, theirs, self.store.labels, self.store.classes, confidence)
        except ValueError as exc:
            return f"predictions.npz: {exc}"
        for side, accuracy in ((row, stats.accuracy), (against, stats.reference_accuracy)):
            table = number(side.get("accuracy"))
            if table is None or abs(table - accuracy) > _TOLERANCE:
                return f"predictions.npz does not match results.json ({side['variant']} [{runtime}] accuracy)"
        return stats


def evaluate(
    rules: list[GateRule],
    rows: list[Row],
    predictions: Predictions | None = None,
    missing: str = NO_PREDICTIONS,
) -> list[Outcome]:
    """Every rule on every (variant, runtime) row it selects, in rule order. ``predictions``: the
    benchmark's per-image predictions (None: not at hand, and ``missing`` says why)."""
    paired = PairedSource(predictions, missing)
    outcomes: list[Outcome] = []
    by_key = {(str(r.get("variant")), str(r.get("runtime"))): r for r in rows}
    table_variants = list(dict.fromkeys(str(r.get("variant")) for r in rows))
    for gate, rule in zip(rule_ids(rules), rules, strict=True):
        metric = rule.metric
        runtimes = [rule.runtime] if rule.runtime != "all" else list(RUNTIME_NAMES)
        if metric.key == "require_parity":
            runtimes = [rt for rt in runtimes if rt in EXPORT_RUNTIMES]
        if rule.variants == "all":
            names = [
                v for v in table_variants if shipped(v) and not (metric.relative and v == rule.reference)
            ]
        else:
            names = list(rule.variants)
        found = 0
        for name in names:
            selected = [by_key[(name, rt)] for rt in runtimes if (name, rt) in by_key]
            if not selected and rule.variants != "all":
                where = rule.runtime if rule.runtime != "all" else "any runtime"
                outcomes.append(
                    Outcome(gate, metric.key, name, rule.runtime, FAILED, f"no benchmark row for {where}")
                )
            for row in selected:
                found += 1
                outcomes.append(_evaluate_row(gate, rule, row, by_key, paired))
        if not names or (rule.variants == "all" and not found):
            outcomes.append(
                Outcome(
                    gate,
                    metric.key,
                    "(none)",
                    rule.runtime,
                    SKIPPED,
                    "no benchmarked variant matches this rule",
                    threshold=rule.threshold,
                )
            )
    return outcomes


def _evaluate_row(
    gate: str, rule: GateRule, row: Row, by_key: dict[tuple[str, str], Row], paired: PairedSource
) -> Outcome:
    metric = rule.metric
    threshold = rule.threshold
    variant, runtime = str(row.get("variant")), str(row.get("runtime"))
    if metric.key == "require_parity":
        return _parity(gate, rule, row)
    if row.get("status") != "ok":
        return Outcome(
            gate,
            metric.key,
            variant,
            runtime,
            FAILED,
            f"not measured: benchmark status {row.get('status')!r}: {row.get('error')}",
            threshold=threshold,
            op=metric.op,
        )
    if metric.key == "min_accuracy":
        return judge(gate, metric, row, number(row.get("accuracy")), threshold)
    if metric.key == "min_above_chance_pp":
        return _above_chance(gate, rule, row)
    if metric.key == "min_sparsity":
        return judge(gate, metric, row, number(row.get("sparsity")), threshold)
    against = by_key.get((rule.reference, runtime))
    if against is None or against.get("status") != "ok":
        why = "has no row" if against is None else f"has status {against.get('status')!r}"
        return Outcome(
            gate,
            metric.key,
            variant,
            runtime,
            FAILED,
            f"cannot compare: {rule.reference!r} {why} in {runtime}",
            threshold=threshold,
            op=metric.op,
            against=rule.reference,
        )
    if metric.key == "max_accuracy_drop":
        return _accuracy_drop(gate, rule, row, against, paired)
    if metric.paired:
        return _paired_rule(gate, rule, row, against, paired)
    if metric.key in ("max_size_ratio", "max_gzip_ratio"):
        column = "size_bytes" if metric.key == "max_size_ratio" else "gzip_bytes"
        value = ratio(row, against, column)
        detail = (
            f" ({byte_count(row.get(column))} / {byte_count(against.get(column))} bytes)"
            if value is not None
            else ""
        )
        return judge(gate, metric, row, value, threshold, rule.reference, detail)
    # max_latency_ratio
    sizes = latency_batch_sizes([row])
    batch = rule.batch_size or (1 if 1 in sizes else (sizes[0] if sizes else 1))
    column = latency_column(batch)
    value = ratio(row, against, column)
    detail = ""
    if value is not None:
        detail = f" (batch {batch}: {number(row[column]):.3f} ms vs {number(against[column]):.3f} ms)"
    return judge(
        gate, metric, row, value, threshold, rule.reference, detail, missing=f"not measured at batch {batch}"
    )


def _skipped(gate: str, rule: GateRule, row: Row, message: str) -> Outcome:
    metric = rule.metric
    variant, runtime = str(row.get("variant")), str(row.get("runtime"))
    return Outcome(
        gate, metric.key, variant, runtime, SKIPPED, message, None, rule.threshold, metric.op, rule.reference
    )


def _paired_rule(gate: str, rule: GateRule, row: Row, against: Row, paired: PairedSource) -> Outcome:
    """``max_class_drop`` and ``max_flip_rate``: skipped (saying why) without both rows' predictions."""
    stats = paired.stats(row, against, rule.confidence)
    if isinstance(stats, str):
        return _skipped(gate, rule, row, f"{rule.metric.what} not measured: {stats}")
    if rule.metric.key == "max_class_drop":
        return _class_drop(gate, rule, row, stats)
    return _flips(gate, rule, row, stats)


def _accuracy_drop(gate: str, rule: GateRule, row: Row, against: Row, paired: PairedSource) -> Outcome:
    """The drop from the table; its interval from the paired predictions, when at hand (which
    ``decide: lower | upper`` needs)."""
    value = accuracy_drop_pp(row, against)
    detail = ""
    if value is not None:
        detail = f" ({rule.reference} {100 * against['accuracy']:.2f}% -> {100 * row['accuracy']:.2f}%)"
    stats = paired.stats(row, against, rule.confidence)
    if isinstance(stats, str):
        if rule.decide != ESTIMATE:
            return _skipped(gate, rule, row, f"decide: {rule.decide} needs the drop's interval: {stats}")
        return judge(gate, rule.metric, row, value, rule.threshold, rule.reference, detail)
    interval = Interval(stats.ci_low_pp, stats.ci_high_pp, stats.confidence)
    return judge(
        gate,
        rule.metric,
        row,
        value,
        rule.threshold,
        rule.reference,
        detail,
        interval=interval,
        decide=rule.decide,
    )


def _class_drop(gate: str, rule: GateRule, row: Row, stats: PairedStats) -> Outcome:
    """The worst class: the largest drop (``decide: estimate``), else the largest interval end
    that decides (a small class with a wide interval may decide over a larger, surer drop)."""
    if not stats.classes:
        return _skipped(gate, rule, row, "class drop not measured: no test images")
    intervals = {n: Interval(c.ci_low_pp, c.ci_high_pp, stats.confidence) for n, c in stats.classes.items()}
    name = max(intervals, key=lambda n: intervals[n].decides(stats.classes[n].drop_pp, rule.decide))
    c = stats.classes[name]
    detail = (
        f" ({rule.reference} {100 * c.reference:.2f}% -> {100 * c.accuracy:.2f}% on its {c.images:,} images)"
    )
    return judge(
        gate,
        rule.metric,
        row,
        c.drop_pp,
        rule.threshold,
        rule.reference,
        detail,
        interval=intervals[name],
        decide=rule.decide,
        what=f"class {name!r} drop",
    )


def _flips(gate: str, rule: GateRule, row: Row, stats: PairedStats) -> Outcome:
    detail = (
        f" ({stats.flips:,} of {stats.images:,} top-1 predictions differ from {rule.reference}'s: "
        f"{stats.broken:,} broken, {stats.fixed:,} fixed)"
    )
    return judge(gate, rule.metric, row, stats.flip_rate, rule.threshold, rule.reference, detail)


def _above_chance(gate: str, rule: GateRule, row: Row) -> Outcome:
    value, classes = above_chance_pp(row), row_num_classes(row)
    detail = ""
    if value is not None and classes:
        accuracy = 100 * float(row["accuracy"])
        detail = f" (accuracy {accuracy:.2f}%, chance {100 / classes:.2f}% with {classes} classes)"
    missing = "not measured"
    if not classes:
        missing += ": the row has no per-class accuracy, so its number of classes is unknown"
    return judge(gate, rule.metric, row, value, rule.threshold, detail=detail, missing=missing)


def _parity(gate: str, rule: GateRule, row: Row) -> Outcome:
    """``require_parity``: the export stage's parity check of this file, skipped when not exported."""
    metric = rule.metric
    variant, runtime = str(row.get("variant")), str(row.get("runtime"))
    ok = row.get("export_ok")
    if ok is None:
        return Outcome(
            gate,
            metric.key,
            variant,
            runtime,
            SKIPPED,
            "no export parity recorded for this file (not exported)",
        )
    agreement, diff = number(row.get("parity_top1_agreement")), number(row.get("parity_max_abs_diff"))
    numbers = []
    if diff is not None:
        numbers.append(f"max|diff| {diff:.2e}")
    if agreement is not None:
        numbers.append(f"top-1 agreement {100 * agreement:.2f}%")
    detail = f" ({', '.join(numbers)})" if numbers else ""
    status = PASSED if ok is True else FAILED
    reason = f": {row.get('error')}" if status == FAILED and row.get("error") else ""
    text = f"export parity {'passed' if ok is True else 'FAILED'}{detail}{reason}"
    value = 1.0 if ok is True else 0.0
    return Outcome(gate, metric.key, variant, runtime, status, text, value, 1.0, "==")
