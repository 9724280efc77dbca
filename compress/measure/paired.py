"""Paired statistics of one variant against its reference on the same test images.

A CI subset of 1,000 images moves the accuracy by 0.1 pp per image, so "dropped 0.3 pp" alone
cannot tell a regression from noise, and an average hides a class that collapsed. Both
variants were scored on the *same* images, so the comparison is paired: what matters is the
images on which they disagree. From the two top-1 prediction vectors and the labels:

- the accuracy drop (reference - variant, pp) with Newcombe's hybrid score interval for a
  difference of paired proportions (Newcombe 1998, method 10). It is closed-form and
  deterministic (no resampling seed, microseconds per pair), its coverage stays near nominal
  when the disagreements are few (where the Wald interval collapses to zero width), and it
  needs only the 2x2 table of right/wrong counts;
- flips: the share of images whose top-1 differs, and the two directions that move accuracy:
  ``fixed`` (the reference was wrong, the variant right) and ``broken`` (the reverse);
- per class: the accuracy delta with the same interval on that class's images, and the worst
  class (the largest drop).

``table_columns`` and ``add_table_columns`` turn these into the benchmark table's paired columns
(``PAIRED_COLUMNS``), each row against the baseline of its runtime.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np

DEFAULT_CONFIDENCE = 0.95


class PredictionStore(Protocol):
    """Every row's top-1 predictions on the same test images (``compress.results.Predictions``):
    what ``add_table_columns`` pairs, named here so that measuring imports nothing above it."""

    labels: np.ndarray
    classes: list[str]

    def get(self, variant: str, runtime: str) -> np.ndarray | None: ...


def wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval of a proportion (the building block of Newcombe's interval)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def paired_drop_interval(
    both: int, ref_only: int, var_only: int, neither: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Interval of (reference accuracy - variant accuracy), as fractions, from the paired 2x2
    counts: images both got right, only the reference, only the variant, neither."""
    n = both + ref_only + var_only + neither
    if n == 0:
        return -1.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p1, p2 = (both + ref_only) / n, (both + var_only) / n  # reference, variant accuracy
    l1, u1 = wilson(both + ref_only, n, z)
    l2, u2 = wilson(both + var_only, n, z)
    margins = (both + ref_only) * (var_only + neither) * (both + var_only) * (ref_only + neither)
    phi = (both * neither - ref_only * var_only) / math.sqrt(margins) if margins > 0 else 0.0
    theta = p1 - p2
    low = theta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = theta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)


@dataclass
class ClassChange:
    """One class: accuracy of reference and variant on its images, the drop (pp) and its interval."""

    images: int
    reference: float
    accuracy: float
    drop_pp: float
    ci_low_pp: float
    ci_high_pp: float


@dataclass
class PairedStats:
    """A variant against its reference on the same test images (drops in pp: positive = worse)."""

    images: int
    confidence: float
    reference_accuracy: float
    accuracy: float
    drop_pp: float
    ci_low_pp: float
    ci_high_pp: float
    flips: int  # images whose top-1 differs from the reference's
    flip_rate: float
    fixed: int  # reference wrong, variant right
    broken: int  # reference right, variant wrong
    classes: dict[str, ClassChange] = field(default_factory=dict)
    worst_class: str | None = None  # the largest drop; None when no class has images

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def worst(self) -> ClassChange | None:
        return self.classes.get(self.worst_class) if self.worst_class is not None else None


def _counts(ref_right: np.ndarray, var_right: np.ndarray) -> tuple[int, int, int, int]:
    return (
        int(np.sum(ref_right & var_right)),
        int(np.sum(ref_right & ~var_right)),
        int(np.sum(~ref_right & var_right)),
        int(np.sum(~ref_right & ~var_right)),
    )


def _change(ref_right: np.ndarray, var_right: np.ndarray, confidence: float) -> ClassChange:
    counts = _counts(ref_right, var_right)
    n = len(ref_right)
    low, high = paired_drop_interval(*counts, confidence=confidence)
    reference, accuracy = (counts[0] + counts[1]) / n, (counts[0] + counts[2]) / n
    return ClassChange(n, reference, accuracy, 100 * (reference - accuracy), 100 * low, 100 * high)


def compare(
    predictions: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedStats:
    """``predictions`` against ``reference`` (top-1 class indices of the same images, in the same
    order) given the true ``labels``. ValueError if the three do not have one length."""
    predictions, reference, labels = (
        np.asarray(a).astype(np.int64) for a in (predictions, reference, labels)
    )
    if not len(predictions) == len(reference) == len(labels):
        raise ValueError(
            f"paired comparison needs the same images: {len(predictions)} predictions, "
            f"{len(reference)} reference predictions, {len(labels)} labels"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    var_right, ref_right = predictions == labels, reference == labels
    overall = _change(ref_right, var_right, confidence)
    flips = int(np.sum(predictions != reference))
    changes: dict[str, ClassChange] = {}
    for index, name in enumerate(classes):
        mask = labels == index
        if mask.any():
            changes[name] = _change(ref_right[mask], var_right[mask], confidence)
    worst = max(changes, key=lambda name: changes[name].drop_pp) if changes else None
    return PairedStats(
        images=len(labels),
        confidence=confidence,
        reference_accuracy=overall.reference,
        accuracy=overall.accuracy,
        drop_pp=overall.drop_pp,
        ci_low_pp=overall.ci_low_pp,
        ci_high_pp=overall.ci_high_pp,
        flips=flips,
        flip_rate=flips / max(len(labels), 1),
        fixed=int(np.sum(~ref_right & var_right)),
        broken=int(np.sum(ref_right & ~var_right)),
        classes=changes,
        worst_class=worst,
    )


def confusion_change(
    predictions: np.ndarray, reference: np.ndarray, labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """Where the broken predictions went: ``[true class, predicted class]`` counts over the images
    the reference got right and the variant got wrong (a class that collapsed into another shows
    up as one heavy cell)."""
    predictions, reference, labels = (
        np.asarray(a).astype(np.int64) for a in (predictions, reference, labels)
    )
    broken = (reference == labels) & (predictions != labels)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels[broken], predictions[broken]), 1)
    return matrix


# ---------------------------------------------------------------- the benchmark table's paired columns

PAIRED_COLUMNS = (
    "accuracy_drop_ci_low_pp",
    "accuracy_drop_ci_high_pp",
    "flip_rate",
    "flips_fixed",
    "flips_broken",
    "worst_class",
    "worst_class_drop_pp",
    "worst_class_drop_ci_low_pp",
    "worst_class_drop_ci_high_pp",
    "class_drop_pp",
    "paired_confidence",
)


def itself(stats: PairedStats) -> PairedStats:
    """A reference compared with itself: no drop and no uncertainty about it (interval 0 to 0)
    and no worst class. ``compare`` would give a narrow interval around 0, the statement about
    another draw of images that a variant with the very same predictions deserves."""
    classes = {name: replace(c, ci_low_pp=0.0, ci_high_pp=0.0) for name, c in stats.classes.items()}
    return replace(stats, ci_low_pp=0.0, ci_high_pp=0.0, classes=classes, worst_class=None)


def table_columns(stats: PairedStats | None) -> dict[str, Any]:
    """One row's paired columns (``PAIRED_COLUMNS``); all None when it has no reference row."""
    if stats is None:
        return dict.fromkeys(PAIRED_COLUMNS)
    worst = stats.worst
    return {
        "accuracy_drop_ci_low_pp": stats.ci_low_pp,
        "accuracy_drop_ci_high_pp": stats.ci_high_pp,
        "flip_rate": stats.flip_rate,
        "flips_fixed": stats.fixed,
        "flips_broken": stats.broken,
        "worst_class": stats.worst_class,
        "worst_class_drop_pp": worst.drop_pp if worst is not None else 0.0,
        "worst_class_drop_ci_low_pp": worst.ci_low_pp if worst is not None else 0.0,
        "worst_class_drop_ci_high_pp": worst.ci_high_pp if worst is not None else 0.0,
        "class_drop_pp": {name: round(c.drop_pp, 3) + 0.0 for name, c in stats.classes.items()},
        "paired_confidence": stats.confidence,
    }


def add_table_columns(
    rows: list[dict[str, Any]], store: PredictionStore, baseline: str, confidence: float = DEFAULT_CONFIDENCE
) -> None:
    """Every measured row's paired columns against ``baseline`` in the same runtime (the reference
    of the table's deltas); None where either side has no predictions."""
    for row in rows:
        variant, runtime = str(row["variant"]), str(row["runtime"])
        ours, reference = store.get(variant, runtime), store.get(baseline, runtime)
        stats = None
        if row.get("status") == "ok" and ours is not None and reference is not None:
            stats = compare(ours, reference, store.labels, store.classes, confidence)
            if variant == baseline:
                stats = itself(stats)
        row.update(table_columns(stats))
