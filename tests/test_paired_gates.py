"""Gates that tell a regression from noise and catch what an average hides (issue 34).

Paired rules on hand-made predictions: the drop's interval in every message, ``decide: lower |
upper`` flipping a borderline drop, ``max_class_drop`` naming the collapsed class,
``max_flip_rate``, and what happens without ``predictions.npz``. Then a real tiny MNIST run
through the CLI: a variant whose one class collapses while its total drops by less than 1 pp
passes ``max_accuracy_drop: 1`` and fails ``max_class_drop: 5`` in gates.json, gates.xml and the
exit code.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from compress import gating
from compress.config import load_pipeline
from compress.context import Context
from compress.fileio import read_json, write_json
from compress.gating import GateRule, evaluate
from compress.measure.paired import PAIRED_COLUMNS
from compress.models import load_model, save_model
from compress.results import PREDICTIONS_FILE, Predictions, load_predictions
from compress.run import main
from compress.stages import config_registry
from tests.conftest import BENCH, PYTORCH_BENCHMARK, TINY_PIPELINE, run_cli, write_pipeline

CLASSES = [str(i) for i in range(10)]


def rules(*specs):
    return [GateRule.model_validate(spec) for spec in specs]


def table(labels, predictions):
    """Benchmark rows and the predictions store for {(variant, runtime): top-1 predictions}."""
    store = Predictions(labels, CLASSES, "fp")
    rows = []
    for (variant, runtime), values in predictions.items():
        store.add(variant, runtime, values)
        accuracy = float(np.mean(values == labels))
        rows.append({"variant": variant, "runtime": runtime, "status": "ok", "accuracy": accuracy})
    return rows, store


@pytest.fixture(scope="module")
def collapse():
    """1,000 images; 'collapsed' breaks 8 of class 3's ~96 right answers (total -0.8 pp), 'noisy'
    shuffles 40 answers both ways (no net drop), 'better' fixes 10."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 1000)
    base = labels.copy()
    wrong = rng.random(1000) < 0.05
    base[wrong] = (labels[wrong] + 1) % 10
    right = np.flatnonzero(~wrong)
    collapsed = base.copy()
    broken = right[labels[right] == 3][:8]
    collapsed[broken] = 5
    noisy = base.copy()
    noisy[right[:20]] = (labels[right[:20]] + 2) % 10
    noisy[np.flatnonzero(wrong)[:20]] = labels[np.flatnonzero(wrong)[:20]]
    better = base.copy()
    better[np.flatnonzero(wrong)[:10]] = labels[np.flatnonzero(wrong)[:10]]
    predictions = {
        ("baseline", "pytorch"): base,
        ("collapsed", "pytorch"): collapsed,
        ("noisy", "pytorch"): noisy,
        ("better", "pytorch"): better,
        ("baseline", "onnxruntime"): base,
        ("collapsed", "onnxruntime"): collapsed,
    }
    return table(labels, predictions)


def one(outcomes, variant="collapsed", runtime="pytorch"):
    [found] = [o for o in outcomes if (o.variant, o.runtime) == (variant, runtime)]
    return found


def test_every_drop_message_states_its_interval(collapse):
    rows, store = collapse
    drop = one(evaluate(rules({"max_accuracy_drop": 0.5}), rows, store))
    assert drop.status == "failed" and drop.value == pytest.approx(0.8)
    assert drop.message.startswith("accuracy drop 0.80 pp (95 % CI ")
    assert " to " in drop.message and ") > max 0.50 pp (baseline " in drop.message
    assert drop.ci_low < 0.8 < drop.ci_high and (drop.confidence, drop.decide) == (0.95, "estimate")
    wider = one(evaluate(rules({"max_accuracy_drop": 0.5, "confidence": 0.99}), rows, store))
    assert "(99 % CI " in wider.message and wider.ci_low < drop.ci_low and wider.ci_high > drop.ci_high


def test_lower_and_upper_flip_a_borderline_drop(collapse):
    rows, store = collapse
    estimate = one(evaluate(rules({"max_accuracy_drop": 0.5}), rows, store))
    between = (estimate.ci_low + estimate.value) / 2  # inside the interval, below the estimate
    lower, upper = evaluate(
        rules(
            {
                "max_accuracy_drop": between,
                "decide": "lower",
                "variants": ["collapsed"],
                "runtime": "pytorch",
            },
            {"max_accuracy_drop": 1.0, "decide": "upper", "variants": ["collapsed"], "runtime": "pytorch"},
        ),
        rows,
        store,
    )
    # the estimate is beyond the threshold, but not significantly: 'lower' passes it
    assert lower.status == "passed" and lower.value == pytest.approx(0.8)
    assert ": lower end " in lower.message and "not significantly beyond" in lower.message
    assert lower.message.startswith("accuracy drop 0.80 pp (95 % CI ")
    # the estimate is within 1.0 pp, but not significantly: 'upper' fails it
    assert upper.status == "failed" and "upper end " in upper.message
    assert "> max 1.00 pp, not significantly within" in upper.message
    assert one(evaluate(rules({"max_accuracy_drop": 1.0}), rows, store)).status == "passed"
    within = one(evaluate(rules({"max_accuracy_drop": 5, "decide": "upper"}), rows, store))
    assert within.status == "passed" and within.message.endswith(
        "significantly within (baseline 94.20% -> 93.40%)"
    )
    beyond = one(evaluate(rules({"max_accuracy_drop": 0.1, "decide": "lower"}), rows, store))
    assert beyond.status == "failed" and "> max 0.10 pp, significantly beyond" in beyond.message


def test_a_class_drop_names_the_class_an_average_hides(collapse):
    rows, store = collapse
    out = evaluate(rules({"max_accuracy_drop": 1.0}, {"max_class_drop": 5}), rows, store)
    total = {(o.variant, o.runtime): o for o in out if o.metric == "max_accuracy_drop"}
    classes = {(o.variant, o.runtime): o for o in out if o.metric == "max_class_drop"}
    assert total[("collapsed", "pytorch")].status == "passed"
    failed = classes[("collapsed", "pytorch")]
    assert failed.status == "failed" and failed.value > 5
    assert failed.message.startswith(f"class '3' drop {failed.value:.2f} pp (95 % CI ")
    assert "> max 5.00 pp (baseline" in failed.message and "images)" in failed.message
    assert classes[("collapsed", "onnxruntime")].status == "failed"  # each runtime against its own
    assert (
        classes[("noisy", "pytorch")].status == "passed" and classes[("better", "pytorch")].status == "passed"
    )
    # decided by the interval: the class's lower end is below 5 pp at 99 %, its upper end above
    lower = one(evaluate(rules({"max_class_drop": 5, "decide": "lower", "confidence": 0.99}), rows, store))
    assert lower.status == "passed" and "class '3' drop" in lower.message and "lower end" in lower.message
    # 'noisy' lost 2 pp on its worst class, within 5 pp; on ~100 images that is not sure: 'upper' fails it
    upper = one(evaluate(rules({"max_class_drop": 5, "decide": "upper"}), rows, store), "noisy")
    assert upper.status == "failed" and ": upper end " in upper.message and upper.value < 5
    assert classes[("noisy", "pytorch")].value == pytest.approx(upper.value)


def test_flip_rate_counts_disagreements_that_cancel_in_the_average(collapse):
    rows, store = collapse
    out = {
        o.variant: o for o in evaluate(rules({"max_flip_rate": 0.02}), rows, store) if o.runtime == "pytorch"
    }
    noisy = out["noisy"]
    assert noisy.status == "failed" and noisy.value == pytest.approx(0.04)
    assert noisy.message == (
        "flip rate 4.00% > max 2.00% "
        "(40 of 1,000 top-1 predictions differ from baseline's: 20 broken, 20 fixed)"
    )
    assert out["collapsed"].status == "passed" and out["better"].status == "passed"
    against = evaluate(
        rules({"max_flip_rate": 0.01, "variants": ["noisy"], "against": "better"}), rows, store
    )
    assert [(o.status, o.against) for o in against] == [("failed", "better")]
    assert "differ from better's" in against[0].message


def test_without_predictions_the_table_still_gates_and_the_rest_is_skipped(collapse):
    rows, _store = collapse
    why = "the benchmark stage 'benchmark' saved no predictions.npz"
    out = evaluate(
        rules(
            {"max_accuracy_drop": 1.0, "variants": ["collapsed"], "runtime": "pytorch"},
            {"max_class_drop": 5, "variants": ["collapsed"], "runtime": "pytorch"},
            {"max_flip_rate": 0.1, "variants": ["collapsed"], "runtime": "pytorch"},
            {"max_accuracy_drop": 1.0, "decide": "upper", "variants": ["collapsed"], "runtime": "pytorch"},
        ),
        rows,
        None,
        why,
    )
    drop, classes, flips, upper = out
    assert drop.status == "passed" and "CI" not in drop.message and drop.ci_low is None
    assert [o.status for o in (classes, flips, upper)] == ["skipped"] * 3
    assert classes.message == f"class drop not measured: {why}"
    assert upper.message == f"decide: upper needs the drop's interval: {why}"
    assert all("\n" not in o.message for o in out)


def test_predictions_that_do_not_match_the_table_are_not_used(collapse):
    rows, store = collapse
    shifted = [dict(r, accuracy=r["accuracy"] - 0.01) if r["variant"] == "collapsed" else r for r in rows]
    drop, classes = evaluate(
        rules(
            {"max_accuracy_drop": 2.0, "variants": ["collapsed"], "runtime": "pytorch"},
            {"max_class_drop": 5, "variants": ["collapsed"], "runtime": "pytorch"},
        ),
        shifted,
        store,
    )
    assert drop.status == "passed" and drop.value == pytest.approx(1.8) and "CI" not in drop.message
    assert classes.status == "skipped" and "does not match results.json" in classes.message


def test_junit_carries_the_interval_and_the_rule_describes_its_decision(collapse):
    rows, store = collapse
    spec = {"max_class_drop": 5, "decide": "upper", "variants": ["collapsed"], "runtime": "pytorch"}
    outcomes = evaluate(rules(spec), rows, store)
    failure = ET.fromstring(gating.junit_xml(outcomes, "demo.gates")).find(".//failure")
    assert failure.get("message") == f"collapsed [pytorch]: {outcomes[0].message}"
    assert "95 % CI" in failure.get("message") and "upper end" in failure.text
    assert rules(spec)[0].describe() == "max_class_drop 5 vs baseline (upper end of the 95 % CI decides)"
    assert rules({"max_flip_rate": 0.05})[0].describe() == "max_flip_rate 0.05 vs baseline"


BAD = [
    ("negative-flip-rate", "{max_flip_rate: -0.1}", ["rules[0].max_flip_rate", "between 0 and 1"]),
    (
        "confidence-one",
        "{max_accuracy_drop: 1, confidence: 1.0}",
        ["rules[0].confidence", "strictly between"],
    ),
    ("confidence-percent", "{max_class_drop: 5, confidence: 95}", ["rules[0].confidence", "0.95"]),
    ("unknown-decide", "{max_class_drop: 5, decide: lowest}", ["rules[0].decide", "'lower'", "'upper'"]),
    ("decide-not-a-drop", "{min_accuracy: 0.9, decide: lower}", ["rules[0]", "decide: only drop rules"]),
    ("confidence-on-flips", "{max_flip_rate: 0.1, confidence: 0.9}", ["rules[0]", "confidence: only drop"]),
]


@pytest.mark.parametrize("rule, words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_paired_rule_is_exit_2_naming_the_key(tmp_path, capsys, rule, words):
    path = write_pipeline(tmp_path, TINY_PIPELINE + BENCH + f"  - stage: gates\n    rules:\n      - {rule}\n")
    code = main([str(path), "--validate"])
    err = capsys.readouterr().err
    assert code == 2 and "stages[4] (gates)" in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err


# ---------------------------------------------------------------- a real hidden collapse, through the CLI

COLLAPSE = (
    """\
  - stage: train
    name: collapse
    output: collapsed
    model: {arch: lenet5, width: 0.5}
    epochs: 0
    init: INIT
"""
    + PYTORCH_BENCHMARK
    + """\
  - stage: gates
    rules:
      - {name: total, max_accuracy_drop: 1.0, variants: [collapsed]}
      - {name: classes, max_class_drop: 5, variants: [collapsed]}
      - {name: flips, max_flip_rate: 0.2, variants: [collapsed]}
"""
)


def collapsed_copy(tiny_run, data_root, path):
    """The tiny baseline with one class's bias lowered just enough that a few more than 5 % of that
    class's images (never 10 images in all) turn wrong; returns (class index, its images,
    images broken, the predictions the copy should make)."""
    pipeline = load_pipeline(tiny_run.pipeline, config_registry())
    ctx = Context(pipeline, "collapse", path.parent / "ctx", torch.device("cpu"), data_root, "test")
    bundle = ctx.data()
    model, spec = load_model(tiny_run.baseline)
    with torch.no_grad():
        logits = model.eval()(bundle.normalize(bundle.test.x).float())
    labels = bundle.test.y.numpy()
    right = logits.argmax(1).numpy() == labels
    counts = np.bincount(labels[right], minlength=len(bundle.classes))
    target = int(np.argmax(counts))  # the class with the most right answers: the most room
    mine = np.flatnonzero(right & (labels == target))
    others = torch.cat([logits[mine, :target], logits[mine, target + 1 :]], 1).max(1).values
    margins = np.sort((logits[mine, target] - others).numpy())
    breaks = int(0.05 * (labels == target).sum()) + 2  # > 5 % of the class, < 1 % of 1,000 images
    assert breaks < 10
    cut = float(margins[breaks - 1] + margins[breaks]) / 2
    with torch.no_grad():
        model.classifier.bias[target] -= cut
        expected = model(bundle.normalize(bundle.test.x).float()).argmax(1).numpy()
    save_model(model, spec, path)
    return target, bundle.classes, breaks, expected


def check_table(reports, name, breaks, expected, classes):
    """results.json: the paired columns on every row, zeros on the baseline's, the collapse on the
    variant's; predictions.npz: one uint8 array per row, the predictions the copy makes."""
    rows = {r["variant"]: r for r in json.loads((reports / "results.json").read_text())}
    base, bad = rows["baseline"], rows["collapsed"]
    assert all(set(PAIRED_COLUMNS) <= set(r) for r in rows.values())
    assert (base["accuracy_drop_ci_low_pp"], base["accuracy_drop_ci_high_pp"]) == (0, 0)
    assert (base["flip_rate"], base["flips_fixed"], base["flips_broken"]) == (0, 0, 0)
    assert base["worst_class"] is None and base["paired_confidence"] == 0.95
    assert set(base["class_drop_pp"].values()) == {0}
    assert bad["worst_class"] == name and bad["flips_broken"] == breaks
    assert -1 < bad["accuracy_delta_pp"] < 0 and bad["worst_class_drop_pp"] > 5  # hidden in the total
    assert bad["class_drop_pp"][name] == round(bad["worst_class_drop_pp"], 3)
    assert bad["accuracy_drop_ci_low_pp"] < -bad["accuracy_delta_pp"] < bad["accuracy_drop_ci_high_pp"]
    stored = load_predictions(reports / PREDICTIONS_FILE)
    assert set(stored.rows) == {"baseline@pytorch", "collapsed@pytorch"} and stored.classes == classes
    assert all(v.dtype == np.uint8 and v.shape == (1000,) for v in stored.rows.values())
    assert np.array_equal(stored.get("collapsed", "pytorch"), expected) and stored.fingerprint
    return bad


def check_class_failure(reports, name, bad):
    """gates.json and gates.xml: the total passes, the class gate fails naming the class."""
    gates = json.loads((reports / "gates.json").read_text())
    assert (gates["passed"], gates["failed"], gates["skipped"]) == (2, 1, 0)
    [failed] = [r for r in gates["results"] if r["status"] == "failed"]
    assert failed["gate"] == "classes" and failed["value"] == pytest.approx(bad["worst_class_drop_pp"])
    assert failed["message"].startswith(f"class {name!r} drop ") and "(95 % CI " in failed["message"]
    assert (failed["ci_low"], failed["ci_high"]) == (
        pytest.approx(bad["worst_class_drop_ci_low_pp"]),
        pytest.approx(bad["worst_class_drop_ci_high_pp"]),
    )
    total = next(r for r in gates["results"] if r["gate"] == "total")
    assert total["status"] == "passed" and "(95 % CI " in total["message"]
    suite = ET.parse(reports / "gates.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("3", "1")
    [case] = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert case.get("classname") == "tiny.gates.classes"
    assert case.find("failure").get("message") == f"collapsed [pytorch]: {failed['message']}"


def forget_predictions(cache):
    """Make the cached benchmark look like one of an older version: no predictions.npz."""
    [entry] = cache.glob("benchmark-*")
    recorded = read_json(entry / "result.json")
    del recorded["files"][PREDICTIONS_FILE], recorded["publish"][PREDICTIONS_FILE]
    write_json(entry / "result.json", recorded)
    (entry / PREDICTIONS_FILE).unlink()


def test_a_hidden_collapse_passes_the_average_and_fails_the_class_gate(tmp_path, tiny_run, data_root, capsys):
    cache = tmp_path / "artifacts" / "tiny" / "cache"
    for entry in (tiny_run.cwd / "artifacts" / "tiny" / "cache").glob("train-*"):  # the baseline, cached
        shutil.copytree(entry, cache / entry.name)
    target, classes, breaks, expected = collapsed_copy(tiny_run, data_root, tmp_path / "collapsed.pt")
    path = write_pipeline(tmp_path, TINY_PIPELINE + COLLAPSE.replace("INIT", str(tmp_path / "collapsed.pt")))
    result = run_cli(path, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 1, result.output
    assert "train            cached" in result.stdout and "Traceback" not in result.output
    reports = tmp_path / "reports" / "tiny"
    bad = check_table(reports, classes[target], breaks, expected, classes)
    check_class_failure(reports, classes[target], bad)

    # all cached, the total's threshold inside its interval: its lower end passes it, its upper end
    # fails it (in-process, to save a Python start-up)
    where = ["--artifacts", str(tmp_path / "artifacts"), "--reports", str(tmp_path / "reports")]
    where += ["--data-root", str(data_root)]
    middle = (bad["accuracy_drop_ci_low_pp"] + bad["accuracy_drop_ci_high_pp"]) / 2
    relax = ["--set", f"gates.rules[0].max_accuracy_drop={middle:.4f}"]
    relax += ["--set", "gates.rules[1].max_class_drop=100"]
    for decide, code, status, words in (
        ("lower", 0, "passed", "not significantly beyond"),
        ("upper", 1, "failed", "not significantly within"),
    ):
        assert main([str(path), *where, *relax, "--set", f"gates.rules[0].decide={decide}"]) == code
        assert "benchmark        cached" in capsys.readouterr().out
        total = json.loads((reports / "gates.json").read_text())["results"][0]
        assert (total["gate"], total["decide"], total["status"]) == ("total", decide, status)
        assert f": {decide} end " in total["message"] and words in total["message"]

    # a benchmark cached without predictions.npz: the table still gates the total, the class and
    # flip gates are skipped with one line each, nothing crashes
    forget_predictions(cache)
    assert main([str(path), *where]) == 0
    out = capsys.readouterr().out
    assert "benchmark        cached" in out and "2 skipped" in out
    gates = json.loads((reports / "gates.json").read_text())
    skipped = [r["message"] for r in gates["results"] if r["status"] == "skipped"]
    assert len(skipped) == 2
    assert all("saved no predictions.npz" in m and "--from benchmark" in m for m in skipped)
    total = next(r for r in gates["results"] if r["gate"] == "total")
    assert total["status"] == "passed" and "CI" not in total["message"]
