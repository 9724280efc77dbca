"""Quality gates over the benchmark table, and the comparison of two results files.

One module decides whether a number is good enough, so the ``gates`` stage (rules in the
pipeline YAML, checked after the benchmark) and ``python -m compress.check`` (a run against a
stored reference) compare numbers the same way, print the same table and write the same
JUnit XML.

Both work on rows of the benchmark stage's ``results.json`` (one row per variant and
runtime; see ``compress/stages/benchmark.py`` for its columns). Relative numbers are always
taken between two rows of the same runtime:

- accuracy drop, in percentage points: ``100 * (accuracy[against] - accuracy[variant])``;
- size / gzip / latency ratio: ``value[variant] / value[against]`` (below 1 is smaller/faster).

Every evaluated gate is an :class:`Outcome` (passed, failed or skipped), whose message holds
the measured value and the threshold.
"""

from __future__ import annotations

import math
import platform
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from compress.config import StrictModel

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
SCRATCH_SUFFIX = ".scratch"  # from-scratch controls (distill stage): not shipped, not gated by 'all'
EXPORT_RUNTIMES = ("torchscript", "onnxruntime")
RUNTIME_NAMES = ("pytorch", "torchscript", "onnxruntime")
_EPS = 1e-9  # float noise, e.g. 100 * (0.981 - 0.971) = 1.0000000000000009 must pass "max 1.0"

Row = dict[str, Any]


# ---------------------------------------------------------------- comparing numbers


def passes(value: float, op: str, threshold: float) -> bool:
    """``value <= threshold`` (op '<=') or ``value >= threshold`` (op '>='), up to float noise."""
    slack = _EPS * max(1.0, abs(threshold))
    if op == "<=":
        return value <= threshold + slack
    if op == ">=":
        return value >= threshold - slack
    raise ValueError(f"unknown comparison {op!r}")


def number(value: Any) -> float | None:
    """A finite float, or None for missing/NaN/non-numeric cells (pandas writes NaN as null)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def accuracy_drop_pp(row: Row, against: Row) -> float | None:
    """Percentage points lost against the other row (negative: the variant is more accurate)."""
    ours, theirs = number(row.get("accuracy")), number(against.get("accuracy"))
    if ours is None or theirs is None:
        return None
    return 100.0 * (theirs - ours)


def ratio(row: Row, against: Row, column: str) -> float | None:
    ours, theirs = number(row.get(column)), number(against.get(column))
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def latency_column(batch_size: int) -> str:
    return f"latency_b{batch_size}_p50_ms"


def latency_batch_sizes(rows: Iterable[Row]) -> list[int]:
    """Batch sizes that have a median-latency column in the rows, ascending."""
    found: set[int] = set()
    for row in rows:
        for key in row:
            if key.startswith("latency_b") and key.endswith("_p50_ms"):
                digits = key[len("latency_b") : -len("_p50_ms")]
                if digits.isdigit():
                    found.add(int(digits))
    return sorted(found)


# ---------------------------------------------------------------- how each gate shows its numbers


def _pct(v: float, digits: int) -> str:
    return f"{100 * v:.{digits}f}%"


def _pp(v: float, digits: int) -> str:
    return f"{v:.{digits}f} pp"


def _times(v: float, digits: int) -> str:
    return f"{v:.{digits + 1}f}x"


def shown_pair(value: float, threshold: float, fmt: Callable[[float, int], str]) -> tuple[str, str]:
    """Both numbers with enough digits that a failing value never prints equal to its threshold."""
    for digits in range(2, 7):
        a, b = fmt(value, digits), fmt(threshold, digits)
        if a != b or value == threshold:
            return a, b
    return fmt(value, 7), fmt(threshold, 7)


@dataclass(frozen=True)
class MetricDef:
    key: str
    op: str  # '<=' for max_*, '>=' for min_*
    relative: bool  # compared with the 'against' variant (same runtime)
    what: str  # the measured quantity, as printed
    fmt: Callable[[float, int], str]
    help: str


METRICS: dict[str, MetricDef] = {
    m.key: m
    for m in (
        MetricDef(
            "max_accuracy_drop",
            "<=",
            True,
            "accuracy drop",
            _pp,
            "percentage points of test accuracy lost against 'against' (same runtime)",
        ),
        MetricDef("min_accuracy", ">=", False, "accuracy", _pct, "test accuracy as a fraction, e.g. 0.97"),
        MetricDef(
            "max_size_ratio",
            "<=",
            True,
            "size ratio",
            _times,
            "file bytes / bytes of 'against' (0.25 = 4x smaller)",
        ),
        MetricDef(
            "max_gzip_ratio", "<=", True, "gzip size ratio", _times, "gzip bytes / gzip bytes of 'against'"
        ),
        MetricDef(
            "max_latency_ratio",
            "<=",
            True,
            "latency ratio",
            _times,
            "median latency / latency of 'against', same runtime and batch size",
        ),
        MetricDef("min_sparsity", ">=", False, "sparsity", _pct, "fraction of zero parameters, e.g. 0.5"),
        MetricDef(
            "require_parity", "==", False, "export parity", _pct, "the export stage's parity check passed"
        ),
    )
}


# ---------------------------------------------------------------- the rule schema (YAML)


class GateRule(StrictModel):
    """One gate: exactly one metric key (``max_accuracy_drop: 1.0``) plus where it applies."""

    name: str | None = Field(None, min_length=1, max_length=100)
    variants: Literal["all"] | list[str] = "all"
    against: str | None = None
    runtime: Literal["all", "pytorch", "torchscript", "onnxruntime"] = "all"
    batch_size: int | None = Field(None, ge=1, le=65536)
    max_accuracy_drop: float | None = Field(None, ge=-100, le=100)
    min_accuracy: float | None = None
    max_size_ratio: float | None = Field(None, gt=0)
    max_gzip_ratio: float | None = Field(None, gt=0)
    max_latency_ratio: float | None = Field(None, gt=0)
    min_sparsity: float | None = Field(None, ge=0, le=1)
    require_parity: bool | None = None

    @field_validator("min_accuracy")
    @classmethod
    def _fraction(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 1:
            raise ValueError(
                f"is a fraction of the test set between 0 and 1 (e.g. 0.97 for 97%), not {value}"
            )
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) and value != "all" else value

    @field_validator("variants")
    @classmethod
    def _names(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("list each variant once, at least one; or write 'all'")
        return value

    @model_validator(mode="after")
    def _one_metric(self) -> GateRule:
        given = [key for key in METRICS if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(
                f"each rule has exactly one gate ({', '.join(METRICS)}); "
                + (f"this one has {len(given)}: {', '.join(given)}" if given else "this one has none")
            )
        metric = METRICS[given[0]]
        if self.require_parity is False:
            raise ValueError("require_parity: false gates nothing; remove the rule instead")
        if self.against is not None and not metric.relative:
            relative = ", ".join(k for k, m in METRICS.items() if m.relative)
            raise ValueError(f"against: only {relative} compare with another variant")
        if self.batch_size is not None and metric.key != "max_latency_ratio":
            raise ValueError("batch_size: only max_latency_ratio is measured per batch size")
        if metric.key == "min_sparsity" and self.variants == "all":
            raise ValueError(
                "variants: min_sparsity needs the pruned variants listed "
                "(baseline and quantized models are dense)"
            )
        if metric.key == "require_parity" and self.runtime == "pytorch":
            raise ValueError(
                "runtime: parity is checked for exported files (torchscript, onnxruntime), not pytorch"
            )
        return self

    @property
    def metric(self) -> MetricDef:
        return next(METRICS[key] for key in METRICS if getattr(self, key) is not None)

    @property
    def threshold(self) -> float:
        value = getattr(self, self.metric.key)
        return 1.0 if value is True else float(value)

    @property
    def reference(self) -> str:
        return self.against or "baseline"

    def named_variants(self) -> list[str]:
        names = [] if self.variants == "all" else list(self.variants)
        return names + ([self.reference] if self.metric.relative else [])

    def describe(self) -> str:
        metric = self.metric
        if metric.key == "require_parity":
            text = "export parity must pass"
        else:
            text = f"{metric.key} {self.threshold:g}"
        if metric.relative:
            text += f" vs {self.reference}"
        if metric.key == "max_latency_ratio" and self.batch_size:
            text += f" (batch {self.batch_size})"
        return text


def rule_ids(rules: list[GateRule]) -> list[str]:
    """A stable id per rule: its name, else its metric (numbered when a metric repeats)."""
    base = [r.name or r.metric.key for r in rules]
    return [b if base.count(b) == 1 else f"{b}#{i}" for i, b in enumerate(base)]


# ---------------------------------------------------------------- outcomes


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


# ---------------------------------------------------------------- gates over one results table


def shipped(name: str) -> bool:
    """False for a from-scratch control: it measures what distillation bought and is no deliverable."""
    return not name.endswith(SCRATCH_SUFFIX)


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
            f" ({_int(row.get(column))} / {_int(against.get(column))} bytes)" if value is not None else ""
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


def _int(value: Any) -> str:
    n = number(value)
    return "?" if n is None else f"{int(n):,}"


# ---------------------------------------------------------------- printing and JUnit


def format_table(outcomes: list[Outcome], title: str = "gates") -> str:
    """A fixed-width pass/fail table, failures first, then a count line."""
    if not outcomes:
        return f"{title}: nothing evaluated"
    order = {FAILED: 0, SKIPPED: 1, PASSED: 2}
    rows = sorted(outcomes, key=lambda o: order.get(o.status, 3))
    gate_w = min(32, max(len(o.gate) for o in rows))
    case_w = min(44, max(len(o.case) for o in rows))
    lines = [f"{title}:"]
    for o in rows:
        mark = {FAILED: "FAIL", PASSED: "pass", SKIPPED: "skip"}.get(o.status, o.status)
        lines.append(f"  {mark:<4}  {o.gate:<{gate_w}}  {o.case:<{case_w}}  {o.message}")
    c = counts(outcomes)
    lines.append(f"{title}: {c[PASSED]} passed, {c[FAILED]} failed, {c[SKIPPED]} skipped")
    return "\n".join(lines)


def junit_xml(outcomes: list[Outcome], suite: str, properties: dict[str, Any] | None = None) -> bytes:
    """JUnit XML: one <testcase> per outcome (classname = suite.gate, name = 'variant [runtime]')."""
    c = counts(outcomes)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    root = ET.Element(
        "testsuites", name=suite, tests=str(c["total"]), failures=str(c[FAILED]), errors="0", time="0"
    )
    element = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(c["total"]),
        failures=str(c[FAILED]),
        errors="0",
        skipped=str(c[SKIPPED]),
        time="0",
        timestamp=stamp,
        hostname=platform.node() or "localhost",
    )
    if properties:
        props = ET.SubElement(element, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", name=str(key), value="" if value is None else str(value))
    for o in outcomes:
        case = ET.SubElement(element, "testcase", classname=f"{suite}.{o.gate}", name=o.case, time="0")
        detail = (
            f"gate: {o.gate} ({o.metric})\nvariant: {o.variant}\nruntime: {o.runtime}\n"
            f"measured: {o.value}\nthreshold: {o.op or ''} {o.threshold}\n"
            + (f"against: {o.against}\n" if o.against else "")
            + f"{o.message}\n"
        )
        if o.status == FAILED:
            ET.SubElement(case, "failure", message=f"{o.case}: {o.message}", type=o.metric).text = detail
        elif o.status == SKIPPED:
            ET.SubElement(case, "skipped", message=o.message)
        else:
            ET.SubElement(case, "system-out").text = detail
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


# ---------------------------------------------------------------- two results files (compress.check)


@dataclass(frozen=True)
class Thresholds:
    max_drop: float = 1.0  # pp of accuracy
    max_size_ratio: float = 1.10  # current bytes / reference bytes
    max_latency_ratio: float = 1.5  # current median / reference median, same CPU and threads only


CHECK_DROP = MetricDef("accuracy_drop", "<=", True, "accuracy drop", _pp, "pp lost against the reference")
CHECK_SIZE = MetricDef("size_ratio", "<=", True, "size ratio", _times, "bytes / reference bytes")
CHECK_LATENCY = MetricDef("latency_ratio", "<=", True, "latency ratio", _times, "median latency / reference")


def machine(row: Row) -> tuple[str, str]:
    threads = number(row.get("threads"))
    return str(row.get("cpu_model") or "unknown CPU"), "?" if threads is None else str(int(threads))


def compare(current: list[Row], reference: list[Row], limits: Thresholds) -> tuple[list[Outcome], list[str]]:
    """Current results against a reference, variant by variant and runtime by runtime.

    Returns the outcomes (a row missing from the current run fails; a new one is reported as
    skipped) and notes for the reader (e.g. latency not compared across different machines).
    """
    notes: list[str] = []
    now = {(str(r["variant"]), str(r["runtime"])): r for r in current}
    then = {(str(r["variant"]), str(r["runtime"])): r for r in reference}
    outcomes: list[Outcome] = []
    mismatched: set[tuple[tuple[str, str], tuple[str, str]]] = set()
    for key, old in then.items():
        variant, runtime = key
        new = now.get(key)
        if new is None:
            gone = "variant" if not any(v == variant for v, _ in now) else "runtime"
            outcomes.append(
                Outcome(
                    "missing",
                    "missing",
                    variant,
                    runtime,
                    FAILED,
                    f"in the reference but missing from current ({gone})",
                )
            )
            continue
        if old.get("status", "ok") != "ok":
            outcomes.append(
                Outcome(
                    "status",
                    "status",
                    variant,
                    runtime,
                    SKIPPED,
                    f"reference row has status {old.get('status')!r}; nothing to compare",
                )
            )
            continue
        if new.get("status", "ok") != "ok":
            outcomes.append(
                Outcome(
                    "status",
                    "status",
                    variant,
                    runtime,
                    FAILED,
                    f"benchmark status {new.get('status')!r}: {new.get('error')}",
                )
            )
            continue
        drop = accuracy_drop_pp(new, old)
        detail = ""
        if drop is not None:
            detail = (
                f" (reference {100 * number(old['accuracy']):.2f}% -> {100 * number(new['accuracy']):.2f}%)"
            )
        outcomes.append(judge("accuracy", CHECK_DROP, new, drop, limits.max_drop, "reference", detail))
        size = ratio(new, old, "size_bytes")
        if size is not None:
            detail = f" ({_int(new.get('size_bytes'))} / {_int(old.get('size_bytes'))} bytes)"
            outcomes.append(judge("size", CHECK_SIZE, new, size, limits.max_size_ratio, "reference", detail))
        same_machine = machine(new) == machine(old)
        for batch in sorted(set(latency_batch_sizes([new])) & set(latency_batch_sizes([old]))):
            column = latency_column(batch)
            value = ratio(new, old, column)
            if value is None:
                continue
            gate = f"latency_b{batch}"
            if not same_machine:
                mismatched.add((machine(old), machine(new)))
                outcomes.append(
                    Outcome(
                        gate,
                        "latency_ratio",
                        variant,
                        runtime,
                        SKIPPED,
                        "latency not compared: measured on a different CPU or thread count",
                    )
                )
                continue
            detail = f" (batch {batch}: {number(new[column]):.3f} ms vs {number(old[column]):.3f} ms)"
            outcomes.append(
                judge(gate, CHECK_LATENCY, new, value, limits.max_latency_ratio, "reference", detail)
            )
    for key, new in now.items():
        if key not in then:
            acc = number(new.get("accuracy"))
            shown = f"accuracy {100 * acc:.2f}%" if acc is not None else f"status {new.get('status')!r}"
            outcomes.append(
                Outcome(
                    "new", "new", key[0], key[1], SKIPPED, f"new, not in the reference ({shown}); not gated"
                )
            )
    for (old_cpu, old_threads), (new_cpu, new_threads) in sorted(mismatched):
        notes.append(
            f"latency not compared: the reference was measured on {old_cpu!r} with {old_threads} thread(s), "
            f"the current run on {new_cpu!r} with {new_threads} thread(s); latency is only comparable on "
            "the same CPU model and thread count"
        )
    return outcomes, notes
