"""``python -m compress.check`` with paired statistics: flips, intervals and per-class drops.

On a real tiny run (a LeNet-5 and its pruned copy, timed in pytorch and onnxruntime): a class
that collapsed in one variant while its total moved by under 1 pp fails, naming the variant and
the class, with the default flags and with the ones ``.ci/run`` uses; ``--update-baseline``
stores the predictions in the one reference file and the next check reports flips; an older
reference (no predictions) passes with a note; a reference measured on other test images says
so and compares numbers only; bad flags exit 2 with one line; the JUnit file carries the same
messages. Synthetic tables cover how ``--decide`` reads an interval.
"""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from compress.benchmarks.ci_noise import CI_FLAGS, collapse_class
from compress.check import main, reference_rows
from compress.gating import reference_file
from compress.results import PREDICTIONS_FILE, Predictions, load_predictions
from tests.conftest import BENCH, TINY_PIPELINE, run_cli, write_pipeline

CI_OPTIONS = [
    "--max-drop", str(CI_FLAGS["max_drop"]), "--max-class-drop", str(CI_FLAGS["max_class_drop"]),
    "--decide", CI_FLAGS["decide"], "--confidence", str(CI_FLAGS["confidence"]),
]  # fmt: skip


IMAGES = 10_000  # all MNIST test images, as .ci/run scores ci-smoke


@pytest.fixture(scope="module")
def bench(tmp_path_factory, data_root) -> Path:
    """reports/tiny of a real run: results.json (4 rows) and predictions.npz on 10,000 MNIST images."""
    cwd = tmp_path_factory.mktemp("paired-check")
    text = TINY_PIPELINE.replace("limit_test: 1000", f"limit_test: {IMAGES}") + BENCH
    result = run_cli(write_pipeline(cwd, text), cwd=cwd, data_root=data_root)
    assert result.returncode == 0, result.output
    reports = cwd / "reports" / "tiny"
    assert (reports / "results.json").is_file() and (reports / PREDICTIONS_FILE).is_file()
    return reports


def copy_run(bench: Path, where: Path, rows: list | None = None, store: Predictions | None = None) -> Path:
    """A run directory like ``bench``'s, optionally with other rows and predictions; its results.json."""
    where.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else json.loads((bench / "results.json").read_text())
    (where / "results.json").write_text(json.dumps(rows))
    if store is not None:
        store.save(where / PREDICTIONS_FILE)
    elif (bench / PREDICTIONS_FILE).is_file():
        shutil.copy(bench / PREDICTIONS_FILE, where / PREDICTIONS_FILE)
    return where / "results.json"


def check(capsys, current: Path, reference: Path, *options: str) -> tuple[int, str]:
    code = main([str(current), "--baseline", str(reference), "--max-latency-ratio", "100", *options])
    return code, capsys.readouterr().out


def write_reference(capsys, bench: Path, path: Path) -> dict:
    assert main([str(bench / "results.json"), "--baseline", str(path), "--update-baseline"]) == 0
    assert f"with the predictions of 4 row(s) on {IMAGES} test images" in capsys.readouterr().out
    return json.loads(path.read_text())


@pytest.mark.slow
def test_update_baseline_stores_predictions_and_the_next_check_reports_flips(bench, tmp_path, capsys):
    written = write_reference(capsys, bench, tmp_path / "reference.json")
    assert written["test_set"]["images"] == IMAGES and len(written["test_set"]["classes"]) == 10
    assert all(len(row["predictions"]) < IMAGES / 4 for row in written["rows"])  # compact: ~90 % right
    _, stored = reference_file.read(written)
    saved = load_predictions(bench / PREDICTIONS_FILE)
    assert np.array_equal(stored.labels, saved.labels) and stored.fingerprint == saved.fingerprint
    assert set(stored.rows) == set(saved.rows)
    assert all(np.array_equal(stored.rows[k], saved.rows[k]) for k in saved.rows)
    assert all(isinstance(row["per_class_accuracy"], dict) for row in written["rows"])
    assert [p.name for p in tmp_path.iterdir()] == ["reference.json"]  # one file, no temp left

    code, out = check(capsys, bench / "results.json", tmp_path / "reference.json")
    assert code == 0, out
    assert re.search(
        r"pass +accuracy +pruned \[onnxruntime\] +accuracy drop 0\.00 pp \(95 % CI -0\.\d\d to 0\.\d\d\)", out
    )
    assert "0 flips (0.0 %): 0 fixed, 0 broken" in out and "note:" not in out.replace("note: latency", "")


def collapsed_run(bench: Path, where: Path, variant: str = "pruned", runtime: str = "onnxruntime"):
    """``bench`` with 8 % of one class's images in ``variant [runtime]`` predicted as the next class."""
    rows = json.loads((bench / "results.json").read_text())
    store = load_predictions(bench / PREDICTIONS_FILE)
    labels = np.asarray(store.labels)
    right = np.asarray(store.get(variant, runtime)) == labels
    # the largest class whose 8 % is under 1 pp of the test set, with that many images right
    one_pp, sizes = len(labels) / 100, [int((labels == i).sum()) for i in range(len(store.classes))]
    fits = [i for i, n in enumerate(sizes) if round(0.08 * n) < one_pp <= right[labels == i].sum()]
    index = max(fits, key=lambda i: sizes[i])
    rows, store = collapse_class(rows, store, variant, runtime, index, 0.08)
    return copy_run(bench, where, rows, store), store.classes[index], rows


@pytest.mark.slow
def test_a_class_collapse_the_average_hides_fails_naming_the_variant_and_the_class(bench, tmp_path, capsys):
    write_reference(capsys, bench, tmp_path / "reference.json")
    current, name, rows = collapsed_run(bench, tmp_path / "collapsed")
    before = {(r["variant"], r["runtime"]): r for r in json.loads((bench / "results.json").read_text())}
    after = next(r for r in rows if (r["variant"], r["runtime"]) == ("pruned", "onnxruntime"))
    total_drop = 100 * (before[("pruned", "onnxruntime")]["accuracy"] - after["accuracy"])
    assert 0.5 < total_drop < 1.0  # the average hides it

    for options in ([], CI_OPTIONS):  # the defaults (estimate, 5 pp) and .ci/run's flags
        junit = tmp_path / "check.xml"
        code, out = check(capsys, current, tmp_path / "reference.json", "--junit", str(junit), *options)
        assert code == 1, out
        line = next(x for x in out.splitlines() if x.lstrip().startswith("FAIL"))
        assert re.match(
            rf" +FAIL +class +pruned \[onnxruntime\] +class '{re.escape(name)}' drop \d+\.\d\d pp ", line
        )
        assert "(95 % CI " in line and "FAILED: 1 regression(s)" in out
        assert re.search(r"pass +accuracy +pruned \[onnxruntime\] .* 0 fixed, [1-9]\d* broken", out), out
        assert re.search(r"pass +class +pruned \[pytorch\]", out), out  # the other runtime is intact
        failures = [c.find("failure") for c in ET.parse(junit).getroot().iter("testcase")]
        messages = [f.get("message") for f in failures if f is not None]
        assert messages == [f"pruned [onnxruntime]: {line.split('pruned [onnxruntime]', 1)[1].strip()}"]


@pytest.mark.slow
def test_an_older_reference_without_predictions_passes_with_a_note(bench, tmp_path, capsys):
    rows = json.loads((bench / "results.json").read_text())
    older = [{k: v for k, v in row.items() if k != "per_class_accuracy"} for row in reference_rows(rows)]
    (tmp_path / "older.json").write_text(json.dumps(older))  # what --update-baseline wrote before
    for options in ([], CI_OPTIONS):
        code, out = check(capsys, bench / "results.json", tmp_path / "older.json", *options)
        assert code == 0, out
        notes = [x for x in out.splitlines() if x.startswith("note:") and "latency" not in x]
        assert notes[0] == (
            "note: the reference holds no predictions and no per-class accuracies (written before check "
            "stored them; refresh it with --update-baseline): flips, intervals and class drops skipped"
        )
        table = [x for x in out.splitlines() if x.startswith("  ")]
        assert not [x for x in table if "flips (" in x or "% CI " in x], out
    assert "decided on their estimates" in notes[-1]  # --decide lower without intervals

    # with per-class accuracies but no predictions: classes compared as numbers, flips skipped
    (tmp_path / "numbers.json").write_text(json.dumps(reference_rows(rows)))
    current, name, _ = collapsed_run(bench, tmp_path / "collapsed")
    code, out = check(capsys, current, tmp_path / "numbers.json")
    assert code == 1 and re.search(
        rf"FAIL +class +pruned \[onnxruntime\] +class '{re.escape(name)}' drop ", out
    )
    assert "note: the reference holds no predictions (written before check stored them" in out


@pytest.mark.slow
def test_a_reference_on_other_test_images_says_so_and_compares_numbers(bench, tmp_path, capsys):
    written = write_reference(capsys, bench, tmp_path / "reference.json")
    other = json.loads(json.dumps(written))
    for row in other["rows"]:
        row["test_count"] = 500
    (tmp_path / "other.json").write_text(json.dumps(other))
    code, out = check(capsys, bench / "results.json", tmp_path / "other.json", "--decide", "lower")
    assert code == 0, out
    mismatch = [x for x in out.splitlines() if "other test images" in x]
    assert mismatch == [
        "note: the reference was measured on other test images "
        f"(test_count 500 in the reference, {IMAGES} now): comparing accuracies and per-class "
        "accuracies as numbers only, no flips or intervals"
    ]
    assert not [x for x in out.splitlines() if x.startswith("  ") and ("flips (" in x or "% CI " in x)], out

    labels = reference_file.decode(written["test_set"]["labels"], "uint8", IMAGES, "labels")
    labels[:2] = labels[1::-1] if labels[0] != labels[1] else (labels[:2] + 1) % 10
    other = json.loads(json.dumps(written))
    other["test_set"]["labels"] = reference_file.encode(labels, "uint8")
    other["test_set"]["fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    code, out = check(capsys, bench / "results.json", tmp_path / "other.json")
    assert code == 0 and "(another label vector; another data fingerprint)" in out, out


@pytest.mark.slow
def test_no_predictions_beside_the_current_results_skips_paired_figures(bench, tmp_path, capsys):
    write_reference(capsys, bench, tmp_path / "reference.json")
    (tmp_path / "alone").mkdir()
    shutil.copy(bench / "results.json", tmp_path / "alone" / "results.json")
    code, out = check(capsys, tmp_path / "alone" / "results.json", tmp_path / "reference.json")
    assert code == 0, out
    assert "note: no predictions.npz beside the current results.json: flips and the intervals" in out
    assert re.search(r"pass +class +pruned \[onnxruntime\] +class '.*' drop -?0\.00 pp <= max 5\.00 pp", out)


# ---------------------------------------------------------------- synthetic: how --decide reads an interval

CLASSES = ["a", "b"]


def synthetic(tmp_path: Path, name: str, wrong: int, start: int = 0) -> Path:
    """1,000 images (500 per class); the row gets ``wrong`` of class 'a' wrong, from image ``start``."""
    labels = np.repeat([0, 1], 500)
    predicted = labels.copy()
    predicted[start : start + wrong] = 1
    store = Predictions(labels, CLASSES, "f" * 64)
    store.add("model", "pytorch", predicted)
    hits = predicted == labels
    row = {"variant": "model", "runtime": "pytorch", "status": "ok", "accuracy": float(hits.mean()),
           "test_count": 1000, "per_class_accuracy": {"a": float(hits[:500].mean()), "b": 1.0}}  # fmt: skip
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps([row]))
    store.save(tmp_path / name / PREDICTIONS_FILE)
    return tmp_path / name / "results.json"


@pytest.fixture
def pair(tmp_path, capsys):
    """A reference with 20 errors and a current run with 35 (15 more: 1.5 pp, 3 pp on class 'a')."""
    reference = synthetic(tmp_path, "reference", 20)
    assert main([str(reference), "--baseline", str(tmp_path / "ref.json"), "--update-baseline"]) == 0
    capsys.readouterr()
    return synthetic(tmp_path, "current", 35), tmp_path / "ref.json"


@pytest.mark.parametrize(
    "decide, limit, code, text",
    [
        ("estimate", "1.0", 1, r"accuracy drop 1\.50 pp \(95 % CI 0\.\d\d to 2\.\d\d\) > max 1\.00 pp"),
        ("lower", "1.0", 0, r"lower end 0\.\d\d pp <= max 1\.00 pp, not significantly beyond"),
        ("lower", "0.5", 1, r"lower end 0\.\d\d pp > max 0\.50 pp, significantly beyond"),
        ("upper", "2.0", 1, r"upper end 2\.\d\d pp > max 2\.00 pp, not significantly within"),
        ("upper", "3.0", 0, r"upper end 2\.\d\d pp <= max 3\.00 pp, significantly within"),
    ],
)
def test_decide_picks_the_number_that_meets_the_limit(pair, capsys, decide, limit, code, text):
    current, reference = pair
    got, out = check(
        capsys, current, reference, "--decide", decide, "--max-drop", limit, "--max-class-drop", "50"
    )
    assert got == code, out
    assert re.search(text, out), out
    assert "15 flips (1.5 %): 0 fixed, 15 broken" in out


def test_the_class_limit_and_the_confidence_flags(pair, capsys):
    current, reference = pair
    code, out = check(capsys, current, reference, "--max-drop", "5", "--max-class-drop", "2.5")
    assert code == 1 and re.search(r"FAIL +class +model \[pytorch\] +class 'a' drop 3\.00 pp \(95 % CI ", out)
    code, out = check(capsys, current, reference, "--max-drop", "5", "--max-class-drop", "2.5",
                      "--decide", "lower", "--confidence", "0.5")  # fmt: skip
    assert code == 1 and "(50 % CI " in out and "significantly beyond" in out, out
    code, out = check(
        capsys, current, reference, "--max-drop", "5", "--max-class-drop", "2.5", "--decide", "lower"
    )
    assert code == 0 and "class 'a' drop 3.00 pp (95 % CI " in out, out


BAD_FLAGS = [
    (["--max-drop", "-1"], "argument --max-drop: must be >= 0, got -1"),
    (["--max-class-drop", "-0.5"], "argument --max-class-drop: must be >= 0, got -0.5"),
    (["--confidence", "0"], "argument --confidence: must be between 0 and 1 (e.g. 0.95), got 0"),
    (["--confidence", "1.5"], "argument --confidence: must be between 0 and 1"),
    (["--confidence", "nan"], "argument --confidence: not a finite number: 'nan'"),
    (["--decide", "sideways"], "argument --decide: must be one of estimate, lower, upper, got 'sideways'"),
]


@pytest.mark.parametrize("flags, words", BAD_FLAGS, ids=[f[0][0] + "=" + f[0][1] for f in BAD_FLAGS])
def test_bad_flag_values_exit_2_with_one_line(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as stopped:
        main(["results.json", "--baseline", "ref.json", *flags])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {words}"), err


def test_unreadable_predictions_are_bad_input(pair, tmp_path, capsys):
    current, reference = pair
    (current.parent / PREDICTIONS_FILE).write_bytes(b"not a zip file")
    code = main([str(current), "--baseline", str(reference)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "not a readable predictions file" in err, err

    written = json.loads(reference.read_text())
    written["rows"][0]["predictions"] = "!!!"
    reference.write_text(json.dumps(written))
    (current.parent / PREDICTIONS_FILE).unlink()
    code = main([str(current), "--baseline", str(reference)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "predictions is not valid base64" in err, err


def test_update_baseline_refuses_predictions_from_another_run(tmp_path, capsys):
    results = synthetic(tmp_path, "run", 20)
    stale = synthetic(tmp_path, "other", 40)
    shutil.copy(stale.parent / PREDICTIONS_FILE, results.parent / PREDICTIONS_FILE)
    code = main([str(results), "--baseline", str(tmp_path / "ref.json"), "--update-baseline"])
    err = capsys.readouterr().err
    assert code == 2 and "predictions disagree with the accuracy of model [pytorch]" in err, err
    assert not (tmp_path / "ref.json").exists()


def test_the_reference_file_round_trips_more_than_256_classes():
    classes = [str(i) for i in range(300)]
    store = Predictions(np.arange(300) % 300, classes, "x")
    store.add("m", "pytorch", (np.arange(300) + 1) % 300)
    rows = [{"variant": "m", "runtime": "pytorch", "accuracy": 0.0}]
    written = json.loads(json.dumps(reference_file.build(rows, store)))
    assert written["test_set"]["dtype"] == "uint16"
    back_rows, back = reference_file.read(written)
    assert back_rows == rows and back.classes == classes and back.fingerprint == "x"
    assert np.array_equal(back.get("m", "pytorch"), (np.arange(300) + 1) % 300)
