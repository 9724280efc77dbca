"""The one tolerance rule: how far a number fell below its reference, and whether that is within
a limit (Intel Neural Compressor's "tolerable loss").

Quantize's fallback, tune's constraint, the quality gates and ``compress.check`` all decide with
these functions, so a drop of exactly the limit passes everywhere. Standard library only: the
gates and ``compress.check`` use it without loading torch.
"""

from __future__ import annotations

import math

DECIMALS = 9  # float noise, e.g. 100 * (0.9922 - 0.9912) = 0.10000000000000009, rounds away here


def drop_pp(reference: float, accuracy: float, *, relative: bool = False) -> float:
    """Accuracy lost against ``reference``, in percentage points (negative when it gained);
    ``relative``: in percent of ``reference`` instead (infinite against a reference of 0).

    Rounded to 1e-9 so a drop of exactly a limit (99.22% -> 99.12% is 0.1 pp, but
    0.100000000000000009 in binary floating point) compares equal to it.
    """
    drop = (reference - accuracy) * 100
    if relative:
        if not reference:
            return math.inf
        drop = drop / reference
    return round(drop, DECIMALS)


def excess(value: float, limit: float) -> float:
    """How far ``value`` is past ``limit``, rounded like ``drop_pp``: <= 0 is within it (Optuna's
    convention for a constraint value)."""
    return round(value - limit, DECIMALS)


def within(value: float, limit: float) -> bool:
    """``value`` at most ``limit``, up to float noise: the comparison every limit is checked with."""
    return excess(value, limit) <= 0


def within_tolerance(reference: float, accuracy: float, tolerance: float | None) -> bool:
    """``accuracy`` lost at most ``tolerance`` pp against ``reference`` (None: no tolerance,
    always within)."""
    return tolerance is None or within(drop_pp(reference, accuracy), tolerance)
