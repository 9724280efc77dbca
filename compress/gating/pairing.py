"""Which rows of a check can be compared image by image, and their paired statistics.

Paired figures (flips, the intervals of the accuracy and class drops) need the top-1
predictions of both runs on the same test images. The reference file carries them (see
``reference_file``), the current run has them in ``predictions.npz`` beside its
``results.json``. A reference measured on other images (another ``test_count``, label vector,
class list or data fingerprint) is compared as numbers only, said in one note line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compress.gating.numbers import Row, number
from compress.measure.paired import PairedStats, compare
from compress.results import Predictions

Key = tuple[str, str]
OLD_REFERENCE = (
    "the reference holds no predictions (written before check stored them; refresh it with "
    "--update-baseline): flips and the intervals of the drops skipped"
)
NO_CURRENT = (
    "no predictions.npz beside the current results.json: flips and the intervals of the drops skipped"
)


@dataclass
class Pairing:
    stats: dict[Key, PairedStats] = field(default_factory=dict)  # rows compared image by image
    same_images: bool = True  # False: another test set, so numbers only (no per-image figures)
    notes: list[str] = field(default_factory=list)


def key(row: Row) -> Key:
    return str(row["variant"]), str(row["runtime"])


def mismatch(
    current: list[Row], reference: list[Row], now: Predictions | None, then: Predictions | None
) -> list[str]:
    """Why the two runs were not measured on the same test images (empty: nothing says so)."""
    reasons = []
    counts = {key(r): number(r.get("test_count")) for r in current}
    for row in reference:
        old, new = number(row.get("test_count")), counts.get(key(row))
        if old is not None and new is not None and old != new:
            reasons.append(f"test_count {int(old)} in the reference, {int(new)} now")
            break
    if now is not None and then is not None:
        if len(now.labels) != len(then.labels):
            reasons.append(f"{len(then.labels)} labels in the reference, {len(now.labels)} now")
        elif not np.array_equal(np.asarray(now.labels, np.int64), np.asarray(then.labels, np.int64)):
            reasons.append("another label vector")
        if list(now.classes) != list(then.classes):
            reasons.append("other class names")
        if now.fingerprint and then.fingerprint and now.fingerprint != then.fingerprint:
            reasons.append("another data fingerprint")
    return reasons


def matches(predictions: np.ndarray, labels: np.ndarray, row: Row) -> bool:
    """The predictions give the row's accuracy (they are this row's, not another run's)."""
    accuracy = number(row.get("accuracy"))
    return accuracy is None or abs(float(np.mean(predictions == labels)) - accuracy) < 1e-6


def pair(
    current: list[Row],
    reference: list[Row],
    now: Predictions | None,
    then: Predictions | None,
    confidence: float,
) -> Pairing:
    """Paired statistics for every row both runs measured on the same images, with notes on
    what could not be paired and why."""
    reasons = mismatch(current, reference, now, then)
    if reasons:
        return Pairing(
            same_images=False,
            notes=[
                f"the reference was measured on other test images ({'; '.join(reasons)}): comparing "
                "accuracies and per-class accuracies as numbers only, no flips or intervals"
            ],
        )
    if then is None:
        return Pairing(notes=[OLD_REFERENCE])
    if now is None:
        return Pairing(notes=[NO_CURRENT])
    result = Pairing()
    rows = {key(r): r for r in current}
    labels = np.asarray(then.labels, np.int64)
    unpaired = []
    for old in reference:
        new = rows.get(key(old))
        if new is None or old.get("status", "ok") != "ok" or new.get("status", "ok") != "ok":
            continue
        ours, theirs = now.get(*key(old)), then.get(*key(old))
        if ours is None or theirs is None:
            unpaired.append(f"{old['variant']} [{old['runtime']}] (no predictions stored)")
        elif not (matches(ours, labels, new) and matches(theirs, labels, old)):
            unpaired.append(f"{old['variant']} [{old['runtime']}] (predictions disagree with its accuracy)")
        else:
            result.stats[key(old)] = compare(ours, theirs, labels, list(then.classes), confidence)
    if unpaired:
        result.notes.append(f"no flips or intervals for {', '.join(unpaired)}")
    return result
