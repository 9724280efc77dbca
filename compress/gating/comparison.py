"""Two results files against each other, row by row: what ``python -m compress.check`` runs.

Each reference row is compared with the current row of the same variant and runtime, with
the same ``judge`` as the gates stage, so both print and fail alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.gating.numbers import (
    Row,
    accuracy_drop_pp,
    byte_count,
    latency_batch_sizes,
    latency_column,
    number,
    pp,
    ratio,
    times,
)
from compress.gating.outcome import FAILED, SKIPPED, Outcome, judge
from compress.gating.rules import MetricDef


@dataclass(frozen=True)
class Thresholds:
    max_drop: float = 1.0  # pp of accuracy
    max_size_ratio: float = 1.10  # current bytes / reference bytes
    max_latency_ratio: float = 1.5  # current median / reference median, same CPU and threads only


CHECK_DROP = MetricDef("accuracy_drop", "<=", True, "accuracy drop", pp, "pp lost against the reference")
CHECK_SIZE = MetricDef("size_ratio", "<=", True, "size ratio", times, "bytes / reference bytes")
CHECK_LATENCY = MetricDef("latency_ratio", "<=", True, "latency ratio", times, "median latency / reference")


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
