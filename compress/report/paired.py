"""How a row's paired figures read: the accuracy delta with its interval, the flips, the worst class.

The benchmark compares each row with the baseline in the same runtime on the same test images
(``compress.measure.paired``): the drop (baseline - variant, pp, positive = worse) with its
confidence interval, the share of top-1 predictions that changed (``fixed``: now right,
``broken``: now wrong) and the class that lost most. The page shows deltas (variant - baseline,
negative = worse), as its "Δ acc." column always did, so an interval [low, high] on the drop
reads as [-high, -low] here.

An older results table has none of these columns: every helper then returns None or "", and
the page shows what it has.
"""

from __future__ import annotations

from typing import Any

from compress.report.formatting import fmt_pp, is_number

DEFAULT_CONFIDENCE = 0.95


def confidence_text(row: dict[str, Any]) -> str:
    """'95 % CI' (from the row's ``paired_confidence``; 95 % when it is not recorded)."""
    level = row.get("paired_confidence")
    level = float(level) if is_number(level) and 0 < float(level) < 1 else DEFAULT_CONFIDENCE
    return f"{100 * level:g} % CI"


def _interval(row: dict[str, Any], low_key: str, high_key: str) -> tuple[float, float] | None:
    """The interval on a drop, as an interval on the delta; None for the baseline's own rows."""
    if row.get("is_baseline"):
        return None
    low, high = row.get(low_key), row.get(high_key)
    if not (is_number(low) and is_number(high)):
        return None
    return -float(high), -float(low)


def delta_interval(row: dict[str, Any]) -> tuple[float, float] | None:
    """The accuracy delta's interval (pp), or None when the row has none."""
    return _interval(row, "accuracy_drop_ci_low_pp", "accuracy_drop_ci_high_pp")


def interval_text(row: dict[str, Any], bounds: tuple[float, float] | None = None) -> str:
    """'95 % CI -0.37 to -0.05' for the accuracy delta (or ``bounds``); '' without an interval."""
    bounds = bounds if bounds is not None else delta_interval(row)
    if bounds is None:
        return ""
    return f"{confidence_text(row)} {bounds[0]:+.2f} to {bounds[1]:+.2f}"


def delta_text(row: dict[str, Any]) -> str:
    """'-0.21 pp (95 % CI -0.37 to -0.05)', or '-0.21 pp' without an interval."""
    interval = interval_text(row)
    return fmt_pp(row.get("accuracy_delta_pp")) + (f" ({interval})" if interval else "")


def drop_is_noise(row: dict[str, Any]) -> bool:
    """True when the interval of the drop reaches zero or below: on these images the variant
    cannot be told apart from the baseline (or is better). False without an interval."""
    bounds = delta_interval(row)
    return bounds is not None and bounds[1] >= 0


def flips(row: dict[str, Any]) -> tuple[float, int | None, int | None] | None:
    """(flip rate, fixed, broken) of a variant's row; None for the baseline or an older table."""
    rate = row.get("flip_rate")
    if row.get("is_baseline") or not is_number(rate):
        return None
    fixed, broken = row.get("flips_fixed"), row.get("flips_broken")
    return (
        float(rate),
        int(fixed) if is_number(fixed) else None,
        int(broken) if is_number(broken) else None,
    )


def flip_counts_text(row: dict[str, Any]) -> str:
    """'3 fixed, 14 broken' ('' when the counts are not recorded)."""
    found = flips(row)
    if found is None or found[1] is None or found[2] is None:
        return ""
    return f"{found[1]} fixed, {found[2]} broken"


def flips_text(row: dict[str, Any]) -> str:
    """'1.7 % (3 fixed, 14 broken)', or '' when the row has no flips."""
    found = flips(row)
    if found is None:
        return ""
    counts = flip_counts_text(row)
    return f"{100 * found[0]:.1f} %" + (f" ({counts})" if counts else "")


def worst_class(row: dict[str, Any]) -> tuple[str, float, tuple[float, float] | None] | None:
    """(class, its delta in pp, the delta's interval) of the class that lost most; None for the
    baseline or an older table."""
    name, drop = row.get("worst_class"), row.get("worst_class_drop_pp")
    if row.get("is_baseline") or name in (None, "") or not is_number(drop):
        return None
    bounds = _interval(row, "worst_class_drop_ci_low_pp", "worst_class_drop_ci_high_pp")
    return str(name), -float(drop), bounds


def worst_text(row: dict[str, Any], interval: bool = True, code: bool = False) -> str:
    """'8 - eight -3.10 pp (95 % CI -6.02 to -0.18)'; 'no class lost accuracy'; '' without data."""
    found = worst_class(row)
    if found is None:
        return ""
    name, delta, bounds = found
    if delta >= 0:
        return "no class lost accuracy"
    shown = f"`{name}`" if code else name
    extra = interval_text(row, bounds) if interval and bounds is not None else ""
    return f"{shown} {fmt_pp(delta)}" + (f" ({extra})" if extra else "")


def worst_is_significant(row: dict[str, Any]) -> bool:
    """True when the worst class's interval lies wholly below zero: a real per-class loss."""
    found = worst_class(row)
    return found is not None and found[2] is not None and found[2][1] < 0


def paired_sentence(row: dict[str, Any]) -> str:
    """One sentence on the flips and the worst class of a variant's row ('' without them)."""
    parts = []
    found = flips(row)
    if found is not None:
        counts = flip_counts_text(row)
        parts.append(f"{100 * found[0]:.1f} % of predictions flipped" + (f" ({counts})" if counts else ""))
    worst = worst_text(row, code=True)
    if worst:
        parts.append(worst if worst == "no class lost accuracy" else f"worst class {worst}")
    if not parts:
        return ""
    images = row.get("test_count")
    where = f" on the same {int(images):,} test images" if is_number(images) else ""
    return f"Against the baseline{where}: " + ", ".join(parts) + "."
