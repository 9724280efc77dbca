"""Gates over one results table: every rule of the gates stage on every row it selects."""

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
from compress.gating.outcome import FAILED, PASSED, SKIPPED, Outcome, judge
from compress.gating.rules import EXPORT_RUNTIMES, RUNTIME_NAMES, GateRule, rule_ids, shipped


def evaluate(rules: list[GateRule], rows: list[Row]) -> list[Outcome]:
    """Every rule on every (variant, runtime) row it selects, in rule order."""
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
                outcomes.append(_evaluate_row(gate, rule, row, by_key))
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


def _evaluate_row(gate: str, rule: GateRule, row: Row, by_key: dict[tuple[str, str], Row]) -> Outcome:
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
        value = accuracy_drop_pp(row, against)
        detail = ""
        if value is not None:
            detail = f" ({rule.reference} {100 * against['accuracy']:.2f}% -> {100 * row['accuracy']:.2f}%)"
        return judge(gate, metric, row, value, threshold, rule.reference, detail)
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
