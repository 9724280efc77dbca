"""Paired statistics of two prediction vectors on the same images (``compress.measure.paired``) and
the benchmark's predictions file (``compress.results``): the drop's interval against
known values, a bootstrap and its coverage; flips, classes and the table's paired columns; the
file's round trip and its refusal of what is not one."""

from __future__ import annotations

import numpy as np
import pytest

from compress.measure import paired
from compress.measure.paired import (
    PAIRED_COLUMNS,
    add_table_columns,
    compare,
    confusion_change,
    paired_drop_interval,
    table_columns,
    wilson,
)
from compress.results import PREDICTIONS_FILE, Predictions, columns, load_predictions, row_key

CLASSES = [str(i) for i in range(10)]


def synthetic(n=1000, broken=24, fixed=5, seed=7):
    """Labels, a ~94 % accurate reference, and a variant that breaks ``broken`` of the reference's
    right answers and fixes ``fixed`` of its wrong ones (drop = (broken - fixed) / n)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    reference = labels.copy()
    wrong = rng.random(n) < 0.06
    reference[wrong] = (labels[wrong] + 3) % 10
    variant = reference.copy()
    right_idx, wrong_idx = np.flatnonzero(~wrong), np.flatnonzero(wrong)
    hit = rng.choice(right_idx, broken, replace=False)
    variant[hit] = (labels[hit] + 1) % 10
    mended = rng.choice(wrong_idx, fixed, replace=False)
    variant[mended] = labels[mended]
    return labels, reference, variant


# ---------------------------------------------------------------- the interval


def test_newcombe_example_brackets_the_estimate():
    # Newcombe (1998), paired example: 12 both right, 9 only the first, 2 only the second, 21 neither
    low, high = paired_drop_interval(12, 9, 2, 21)
    assert (low, high) == (pytest.approx(0.0182, abs=5e-4), pytest.approx(0.2892, abs=5e-4))
    assert low < (9 - 2) / 44 < high
    # the other direction is the mirror image
    assert paired_drop_interval(12, 2, 9, 21) == pytest.approx((-high, -low))


def test_the_interval_narrows_with_more_images_and_widens_with_confidence():
    widths = []
    for scale in (1, 4, 16):
        low, high = paired_drop_interval(*(scale * c for c in (800, 30, 10, 160)))
        assert low < 20 / 1000 < high
        widths.append(high - low)
    assert widths[0] > 1.9 * widths[1] > 1.9 * 1.9 * widths[2]  # ~1/sqrt(n)
    narrow = paired_drop_interval(800, 30, 10, 160, confidence=0.8)
    wide = paired_drop_interval(800, 30, 10, 160, confidence=0.99)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]


def test_no_disagreement_still_has_an_interval_and_no_images_has_the_widest():
    low, high = paired_drop_interval(900, 0, 0, 100)
    assert low == pytest.approx(-high) and 0.002 < high < 0.005  # not zero: another draw may disagree
    assert paired_drop_interval(0, 0, 0, 0) == (-1.0, 1.0)
    assert wilson(0, 0, 1.96) == (0.0, 1.0)


def test_the_interval_matches_a_seeded_bootstrap_on_1000_images():
    labels, reference, variant = synthetic()
    stats = compare(variant, reference, labels, CLASSES)
    assert stats.drop_pp == pytest.approx(100 * (24 - 5) / 1000)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(labels), (4000, len(labels)))
    ref_right, var_right = reference == labels, variant == labels
    drops = 100 * (ref_right[draws].mean(1) - var_right[draws].mean(1))
    low, high = np.percentile(drops, [2.5, 97.5])
    assert stats.ci_low_pp == pytest.approx(low, abs=0.3)
    assert stats.ci_high_pp == pytest.approx(high, abs=0.3)


@pytest.mark.parametrize("only_ref, only_var", [(0.002, 0.001), (0.005, 0.0), (0.01, 0.004)])
def test_coverage_stays_near_nominal_with_few_disagreements(only_ref, only_var):
    """Where a Wald interval collapses (a handful of flips on 1,000 images), the 95 % interval
    still holds the true drop in about 95 % of draws or more."""
    rng = np.random.default_rng(1)
    probs = [0.9 - only_ref, only_ref, only_var, 0.1 - only_var]
    truth = only_ref - only_var
    counts = rng.multinomial(1000, probs, size=2000)
    covered = [low <= truth <= high for low, high in (paired_drop_interval(*map(int, c)) for c in counts)]
    assert np.mean(covered) >= 0.93


# ---------------------------------------------------------------- flips and classes


def test_flips_fixed_broken_and_the_worst_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    reference = np.array([0, 0, 0, 1, 1, 1, 1, 0, 2, 2])  # 8 right
    variant = np.array([0, 2, 2, 0, 1, 1, 1, 0, 2, 0])  # breaks two 0s and one 2, fixes one 0
    stats = compare(variant, reference, labels, ["zero", "one", "two", "three"])
    assert (stats.flips, stats.broken, stats.fixed) == (4, 3, 1)
    assert stats.flip_rate == pytest.approx(0.4)
    assert stats.reference_accuracy == pytest.approx(0.8) and stats.accuracy == pytest.approx(0.6)
    assert stats.drop_pp == pytest.approx(20.0)
    assert set(stats.classes) == {"zero", "one", "two"}  # 'three' has no images
    zero = stats.classes["zero"]
    assert (zero.images, zero.reference, zero.accuracy) == (4, 0.75, 0.5)
    assert zero.drop_pp == pytest.approx(25.0) and zero.ci_low_pp < 25 < zero.ci_high_pp
    assert stats.classes["one"].drop_pp == 0 and stats.classes["two"].drop_pp == pytest.approx(50.0)
    assert stats.worst_class == "two" and stats.worst is stats.classes["two"]
    with pytest.raises(ValueError, match="same images"):
        compare(variant[:-1], reference, labels, CLASSES)
    with pytest.raises(ValueError, match="confidence"):
        compare(variant, reference, labels, CLASSES, confidence=1.0)


def test_confusion_change_shows_where_a_collapsed_class_went():
    labels = np.array([3, 3, 3, 3, 5, 5, 1])
    reference = np.array([3, 3, 3, 8, 5, 5, 1])
    variant = np.array([5, 5, 3, 5, 5, 3, 7])  # two 3s -> 5 (broken), one 5 -> 3, one 1 -> 7
    matrix = confusion_change(variant, reference, labels, 10)
    assert matrix.shape == (10, 10) and matrix.sum() == 4
    assert (matrix[3, 5], matrix[5, 3], matrix[1, 7]) == (2, 1, 1)
    assert matrix[3, 8] == 0  # the reference was already wrong there: not broken


# ---------------------------------------------------------------- the benchmark table's paired columns


def test_the_paired_columns_are_in_the_table_and_a_baseline_row_is_all_zeros():
    assert set(PAIRED_COLUMNS) <= set(columns([1]))
    labels, reference, variant = synthetic()
    store = Predictions(labels, CLASSES)
    store.add("baseline", "pytorch", reference)
    store.add("pruned", "pytorch", variant)
    store.add("pruned", "onnxruntime", variant)  # no baseline row in onnxruntime
    rows = [
        {"variant": "baseline", "runtime": "pytorch", "status": "ok"},
        {"variant": "pruned", "runtime": "pytorch", "status": "ok"},
        {"variant": "pruned", "runtime": "onnxruntime", "status": "ok"},
        {"variant": "slim", "runtime": "pytorch", "status": "error"},
    ]
    add_table_columns(rows, store, "baseline")
    base, pruned, lone, failed = rows
    assert all(set(PAIRED_COLUMNS) <= set(r) for r in rows)
    assert base["accuracy_drop_ci_low_pp"] == base["accuracy_drop_ci_high_pp"] == 0.0
    assert (base["flip_rate"], base["flips_fixed"], base["flips_broken"]) == (0.0, 0, 0)
    assert base["worst_class"] is None and base["worst_class_drop_pp"] == 0.0
    assert (base["worst_class_drop_ci_low_pp"], base["worst_class_drop_ci_high_pp"]) == (0.0, 0.0)
    assert set(base["class_drop_pp"].values()) == {0.0} and len(base["class_drop_pp"]) == 10
    stats = compare(variant, reference, labels, CLASSES)
    assert pruned == {**pruned, **table_columns(stats)}
    assert (pruned["flips_broken"], pruned["flips_fixed"]) == (24, 5)
    assert pruned["accuracy_drop_ci_low_pp"] < 1.9 < pruned["accuracy_drop_ci_high_pp"]
    worst = pruned["worst_class"]
    assert pruned["worst_class_drop_pp"] == max(c.drop_pp for c in stats.classes.values())
    assert pruned["class_drop_pp"][worst] == round(pruned["worst_class_drop_pp"], 3)
    assert all(round(v, 3) == v for v in pruned["class_drop_pp"].values())
    assert pruned["paired_confidence"] == 0.95
    for row in (lone, failed):  # no baseline in its runtime / not measured
        assert all(row[c] is None for c in PAIRED_COLUMNS)


# ---------------------------------------------------------------- the predictions file


def test_predictions_file_round_trip(tmp_path):
    labels, reference, variant = synthetic(n=300)
    store = Predictions(labels, CLASSES, fingerprint="abc123")
    store.add("baseline", "pytorch", reference)
    store.add("pruned.int8", "onnxruntime", variant)
    path = tmp_path / PREDICTIONS_FILE
    store.save(path)
    back = load_predictions(path)
    assert back.classes == CLASSES and back.fingerprint == "abc123"
    assert np.array_equal(back.labels, labels)
    assert set(back.rows) == {row_key("baseline", "pytorch"), "pruned.int8@onnxruntime"}
    assert back.get("pruned.int8", "onnxruntime").dtype == np.uint8
    assert np.array_equal(back.get("pruned.int8", "onnxruntime"), variant)
    assert back.get("pruned.int8", "pytorch") is None
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temp file left
    with pytest.raises(ValueError, match="300 labels"):
        store.add("short", "pytorch", variant[:10])
    many = Predictions(np.arange(300) % 300, [f"c{i}" for i in range(300)])
    many.add("v", "pytorch", np.arange(300))
    assert many.rows["v@pytorch"].dtype == np.uint16


def test_a_file_that_is_not_a_predictions_file_is_refused(tmp_path):
    cases = {
        "text.npz": lambda p: p.write_text("results,accuracy\n", encoding="utf-8"),
        "array.npy": lambda p: np.save(p, np.arange(3)),
        "broken.npz": lambda p: p.write_bytes(b"PK\x03\x04 not a zip"),
        "other.npz": lambda p: np.savez(p, weights=np.ones(3)),
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError, match=name):
            load_predictions(path)
    with pytest.raises(ValueError, match="missing.npz"):
        load_predictions(tmp_path / "missing.npz")
    assert paired.DEFAULT_CONFIDENCE == 0.95
