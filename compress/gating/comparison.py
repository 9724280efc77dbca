"""Two results files against each other, row by row: what ``python -m compress.check`` runs.

Each reference row is compared with the current row of the same variant and runtime:

- accuracy: the drop in pp, with its paired interval and the flips (images whose top-1 changed:
  fixed, broken) when both runs' predictions on the same images are at hand (``pairing``);
- classes: every class's drop, from the predictions (with its interval) or else from both
  rows' ``per_class_accuracy``, so a class that collapsed fails even when the average hides it;
- size, and latency on the same CPU model and thread count only.

``Thresholds.decide`` says which number of a drop meets its limit (see ``drops``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compress.gating.drops import (
    CHECK_DROP,
    Drop,
    class_drops,
    flips_text,
    judge_classes,
    judge_drop,
)
from compress.gating.numbers import (
    Row,
    accuracy_drop_pp,
    byte_count,
    latency_batch_sizes,
    latency_column,
    number,
    ratio,
    times,
)
from compress.gating.outcome import DECIDE_MODES, FAILED, SKIPPED, Outcome, judge
from compress.gating.pairing import OLD_REFERENCE, Key, key, pair
from compress.gating.rules import MetricDef
from compress.measure.paired import DEFAULT_CONFIDENCE, PairedStats
from compress.results import Predictions


@dataclass(frozen=True)
class Thresholds:
    max_drop: float = 1.0  # pp of accuracy
    max_size_ratio: float = 1.10  # current bytes / reference bytes
    max_latency_ratio: float = 1.5  # current median / reference median, same CPU and threads only
    max_class_drop: float = 5.0  # pp of any one class's accuracy
    decide: str = "estimate"  # which number of a drop meets its limit: estimate | lower | upper
    confidence: float = DEFAULT_CONFIDENCE  # of the paired intervals

    def __post_init__(self) -> None:
        if self.decide not in DECIDE_MODES:
            raise ValueError(f"decide must be one of {', '.join(DECIDE_MODES)}, got {self.decide!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if min(self.max_drop, self.max_class_drop) < 0:
            raise ValueError("drop limits must be >= 0")


CHECK_SIZE = MetricDef("size_ratio", "<=", True, "size ratio", times, "bytes / reference bytes")
CHECK_LATENCY = MetricDef("latency_ratio", "<=", True, "latency ratio", times, "median latency / reference")


@dataclass
class Comparison:
    """What a check found: one outcome per compared quantity, notes, and the paired figures."""

    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paired: dict[Key, PairedStats] = field(default_factory=dict)


def machine(row: Row) -> tuple[str, str]:
    threads = number(row.get("threads"))
    return str(row.get("cpu_model") or "unknown CPU"), "?" if threads is None else str(int(threads))


def compare(
    current: list[Row],
    reference: list[Row],
    limits: Thresholds,
    now: Predictions | None = None,
    then: Predictions | None = None,
) -> tuple[list[Outcome], list[str]]:
    """The outcomes and notes of :func:`compare_runs`."""
    result = compare_runs(current, reference, limits, now, then)
    return result.outcomes, result.notes


def compare_runs(
    current: list[Row],
    reference: list[Row],
    limits: Thresholds,
    now: Predictions | None = None,
    then: Predictions | None = None,
) -> Comparison:
    """Current results against a reference, variant by variant and runtime by runtime; ``now``
    and ``then`` are the two runs' predictions (None: not at hand, so no paired figures).

    A row missing from the current run fails; a new one is reported as skipped. Notes tell the
    reader what was not compared and why (another machine, another test set, no predictions).
    """
    pairing = pair(current, reference, now, then, limits.confidence)
    result = Comparison(notes=list(pairing.notes), paired=pairing.stats)
    rows = {key(r): r for r in current}
    mismatched: set[tuple[tuple[str, str], tuple[str, str]]] = set()
    unpaired: list[Key] = []
    no_classes: list[Key] = []
    for old in reference:
        new = rows.get(key(old))
        state = _row_state(old, new, rows)
        if state is not None:
            result.outcomes.append(state)
            continue
        assert new is not None
        stats = pairing.stats.get(key(old))
        if stats is None:
            unpaired.append(key(old))
        result.outcomes.append(_accuracy(new, old, stats, limits))
        judged = judge_classes(
            new, class_drops(new, old, stats), limits.max_class_drop, limits.decide, limits.confidence
        )
        if judged is None:
            no_classes.append(key(old))
        else:
            result.outcomes.append(judged)
        result.outcomes.extend(_size_and_latency(new, old, limits, mismatched))
    result.outcomes.extend(_new_rows(current, reference))
    result.notes.extend(_latency_notes(mismatched))
    _class_note(result.notes, no_classes, reference)
    if unpaired and limits.decide != "estimate":
        result.notes.append(
            f"--decide {limits.decide}: {len(unpaired)} row(s) have no interval (no predictions of the "
            "same images on both sides), decided on their estimates"
        )
    return result


def _row_state(old: Row, new: Row | None, rows: dict[Key, Row]) -> Outcome | None:
    """The outcome when the pair cannot be compared (missing, or a row that did not run)."""
    variant, runtime = key(old)
    if new is None:
        gone = "variant" if not any(v == variant for v, _ in rows) else "runtime"
        return Outcome(
            "missing",
            "missing",
            variant,
            runtime,
            FAILED,
            f"in the reference but missing from current ({gone})",
        )
    if old.get("status", "ok") != "ok":
        message = f"reference row has status {old.get('status')!r}; nothing to compare"
        return Outcome("status", "status", variant, runtime, SKIPPED, message)
    if new.get("status", "ok") != "ok":
        message = f"benchmark status {new.get('status')!r}: {new.get('error')}"
        return Outcome("status", "status", variant, runtime, FAILED, message)
    return None


def _accuracy(new: Row, old: Row, stats: PairedStats | None, limits: Thresholds) -> Outcome:
    drop = accuracy_drop_pp(new, old)
    if drop is None:
        return judge("accuracy", CHECK_DROP, new, None, limits.max_drop, "reference")
    interval = Drop(drop) if stats is None else Drop(drop, stats.ci_low_pp, stats.ci_high_pp)
    flips = "" if stats is None else f"; {flips_text(stats)}"
    detail = (
        f" (reference {100 * number(old['accuracy']):.2f}% -> {100 * number(new['accuracy']):.2f}%{flips})"
    )
    return judge_drop(
        "accuracy",
        CHECK_DROP,
        new,
        interval,
        limits.max_drop,
        limits.decide,
        limits.confidence,
        detail=detail,
    )


def _size_and_latency(new: Row, old: Row, limits: Thresholds, mismatched: set) -> list[Outcome]:
    outcomes = []
    size = ratio(new, old, "size_bytes")
    if size is not None:
        detail = f" ({byte_count(new.get('size_bytes'))} / {byte_count(old.get('size_bytes'))} bytes)"
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
            message = "latency not compared: measured on a different CPU or thread count"
            outcomes.append(Outcome(gate, "latency_ratio", *key(new), SKIPPED, message))
            continue
        detail = f" (batch {batch}: {number(new[column]):.3f} ms vs {number(old[column]):.3f} ms)"
        outcomes.append(judge(gate, CHECK_LATENCY, new, value, limits.max_latency_ratio, "reference", detail))
    return outcomes


def _new_rows(current: list[Row], reference: list[Row]) -> list[Outcome]:
    known = {key(r) for r in reference}
    outcomes = []
    for new in current:
        if key(new) not in known:
            acc = number(new.get("accuracy"))
            shown = f"accuracy {100 * acc:.2f}%" if acc is not None else f"status {new.get('status')!r}"
            message = f"new, not in the reference ({shown}); not gated"
            outcomes.append(Outcome("new", "new", *key(new), SKIPPED, message))
    return outcomes


def _latency_notes(mismatched: set) -> list[str]:
    return [
        f"latency not compared: the reference was measured on {old_cpu!r} with {old_threads} thread(s), "
        f"the current run on {new_cpu!r} with {new_threads} thread(s); latency is only comparable on "
        "the same CPU model and thread count"
        for (old_cpu, old_threads), (new_cpu, new_threads) in sorted(mismatched)
    ]


def _class_note(notes: list[str], unchecked: list[Key], reference: list[Row]) -> None:
    """One line on the rows whose classes were not compared (merged with the older-file note)."""
    if not unchecked:
        return
    if not any(isinstance(r.get("per_class_accuracy"), dict) for r in reference):
        if OLD_REFERENCE in notes:
            notes.remove(OLD_REFERENCE)
            notes.append(
                "the reference holds no predictions and no per-class accuracies (written before check "
                "stored them; refresh it with --update-baseline): flips, intervals and class drops skipped"
            )
        else:
            notes.append(
                "the reference holds no per-class accuracies (refresh it with --update-baseline): "
                "class drops not checked"
            )
        return
    shown = ", ".join(f"{v} [{r}]" for v, r in unchecked)
    notes.append(f"class drops not checked for {shown}: no per-class accuracies on both sides")
