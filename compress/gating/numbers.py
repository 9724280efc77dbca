"""The numbers a gate reads off benchmark rows, how it compares them, and how it prints them.

Relative numbers are always taken between two rows of the same runtime:

- accuracy drop, in percentage points: ``100 * (accuracy[against] - accuracy[variant])``;
- size / gzip / latency ratio: ``value[variant] / value[against]`` (below 1 is smaller/faster).

Drops and comparisons are the measuring package's (``compress.measure.rules``): a gate, the
check, tune's constraint and quantize's fallback all round the same way, so a value of exactly
its threshold meets it everywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from compress.measure.rules import drop_pp, within

Row = dict[str, Any]


# ---------------------------------------------------------------- comparing numbers


def passes(value: float, op: str, threshold: float) -> bool:
    """``value <= threshold`` (op '<=') or ``value >= threshold`` (op '>='), up to float noise
    (``measure.rules.within``: 100 * (0.981 - 0.971) = 1.0000000000000009 passes "max 1.0")."""
    if op == "<=":
        return within(value, threshold)
    if op == ">=":
        return within(threshold, value)
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
    return drop_pp(theirs, ours)


def ratio(row: Row, against: Row, column: str) -> float | None:
    ours, theirs = number(row.get(column)), number(against.get(column))
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def latency_column(batch_size: int) -> str:
    return f"latency_b{batch_size}_p50_ms"


def latency_batch_sizes(rows: Iterable[Row]) -> list[int]:
    """Batch sizes that have a median-latency column in the rows, ascending.

    The report's table, warnings and comparisons use it too, so the gates and the page agree
    on which batch sizes were timed.
    """
    found: set[int] = set()
    for row in rows:
        for key in row:
            match = re.fullmatch(r"latency_b(\d+)_p50_ms", key)
            if match:
                found.add(int(match.group(1)))
    return sorted(found)


# ---------------------------------------------------------------- how each gate shows its numbers


def pct(v: float, digits: int) -> str:
    return f"{100 * v:.{digits}f}%"


def pp(v: float, digits: int) -> str:
    return f"{v:.{digits}f} pp"


def times(v: float, digits: int) -> str:
    return f"{v:.{digits + 1}f}x"


def shown_digits(value: float, threshold: float, fmt: Callable[[float, int], str]) -> int:
    """The fewest digits (2 to 7) at which a value that differs from its threshold prints differently."""
    for digits in range(2, 7):
        if fmt(value, digits) != fmt(threshold, digits) or value == threshold:
            return digits
    return 7


def shown_pair(value: float, threshold: float, fmt: Callable[[float, int], str]) -> tuple[str, str]:
    """Both numbers with enough digits that a failing value never prints equal to its threshold."""
    digits = shown_digits(value, threshold, fmt)
    return fmt(value, digits), fmt(threshold, digits)


def confidence_text(confidence: float) -> str:
    """A confidence level as printed in a gate's message: 0.95 -> '95 %'."""
    return f"{100 * confidence:g} %"


def byte_count(value: Any) -> str:
    """A byte count with thousands separators for a gate's message; '?' when not a number."""
    n = number(value)
    return "?" if n is None else f"{int(n):,}"
