"""A model at chance is said loudly: the rule on hand-made rows and histories, the
``min_above_chance_pp`` gate, and real CLI runs on MNIST subsets: one whose baseline learns nothing
(a warning in the closing summary, at the top of the page and of summary.md, no recommendation,
exit 1 only with the gate) and a healthy tiny LeNet that gets no such warning."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from compress.gating import GateRule, evaluate
from compress.gating.chance import (
    CHANCE_MARGIN_PP,
    LOSS_STUCK_FRACTION,
    at_chance,
    find_num_classes,
    trained_histories,
    warning,
)
from compress.report import ReportInputs, build_page, render_markdown
from tests.conftest import BENCH, PYTORCH_BENCHMARK, TINY_PIPELINE, run_cli, write_pipeline


def row(variant, accuracy, runtime="pytorch", classes=10, **values):
    per_class = {str(i): accuracy for i in range(classes)} if classes else None
    return {"variant": variant, "runtime": runtime, "status": "ok", "accuracy": accuracy,
            "per_class_accuracy": per_class, **values}  # fmt: skip


def names(found):
    return [f.variant for f in found]


# ---------------------------------------------------------------- the rule


def test_accuracy_within_the_margin_above_chance_is_at_chance_and_below_it_too():
    assert CHANCE_MARGIN_PP == 5.0
    rows = [row("edge", 0.15), row("above", 0.1501), row("below", 0.02), row("good", 0.9)]
    found = at_chance(rows)
    assert names(found) == ["edge", "below"]  # 100 * 0.15 - 10 = 5.000000000000002: still the margin
    assert found[0].accuracies == {"pytorch": 0.15} and found[0].num_classes == 10


def test_the_number_of_classes_sets_chance():
    two = [row("a", 0.55, classes=2), row("b", 0.56, classes=2)]
    assert names(at_chance(two)) == ["a"]
    hundred = [row("a", 0.06, classes=100), row("b", 0.061, classes=100), row("c", 0.3, classes=100)]
    assert names(at_chance(hundred)) == ["a"]
    assert at_chance(hundred)[0].chance == pytest.approx(0.01)
    # results.csv keeps per-class accuracy as JSON; a row without it takes the run's count
    as_text = [{**row("a", 0.36), "per_class_accuracy": json.dumps({"x": 1, "y": 0.1, "z": 0})}]
    assert names(at_chance(as_text)) == ["a"]  # 3 classes: 2.7 pp above chance (26 pp at 10 classes)
    bare = [{**row("a", 0.3), "per_class_accuracy": None}]
    assert at_chance(bare) == [] and names(at_chance(bare, num_classes=4)) == ["a"]
    assert find_num_classes(bare) is None and find_num_classes(bare + [row("b", 0.9, classes=7)]) == 7


def test_any_runtime_row_at_chance_flags_the_variant_and_failed_rows_are_ignored():
    rows = [row("q", 0.95), row("q", 0.11, runtime="onnxruntime"), row("x", 0.0, status="error")]
    found = at_chance(rows)
    assert names(found) == ["q"] and found[0].accuracies == {"onnxruntime": 0.11}


def test_training_loss_that_never_left_ln_c_is_at_chance_whatever_the_accuracy():
    stuck = LOSS_STUCK_FRACTION * math.log(10)
    histories = trained_histories(
        [
            ("train", {"history": [{"train_loss": 2.31}, {"train_loss": stuck + 0.001}]}, ["baseline"]),
            ("train", {"history": [{"train_loss": 2.31}, {"train_loss": stuck - 0.01}]}, ["learnt"]),
            ("distill", {"history": [{"train_loss": 9.0}]}, ["student"]),  # a KD loss: not bounded by ln C
            ("prune", {"history": [{"train_loss": 2.3}]}, ["a", "b"]),  # whose history? nobody's
            ("prune", {"history": [{"train_loss": float("nan")}]}, ["diverged"]),
        ]
    )
    assert set(histories) == {"baseline", "learnt", "diverged"}
    rows = [row("baseline", 0.4), row("learnt", 0.4), row("diverged", 0.4)]
    found = at_chance(rows, histories)
    assert names(found) == ["baseline", "diverged"]
    assert found[0].accuracies == {} and found[0].losses == pytest.approx((2.31, stuck + 0.001))
    text = warning(found)
    assert "`baseline` (training loss 2.07 at its last epoch)" in text
    assert "never fell below 0.9 x ln(10) = 2.07" in text and "`optimizer.lr`" in text
    assert at_chance(rows, {"baseline": [{"epoch": 1}]}) == []  # no loss recorded: no verdict


def test_the_warning_names_the_variant_its_accuracy_chance_and_what_to_try():
    text = warning(at_chance([row("baseline", 0.1135), row("baseline", 0.1135, runtime="onnxruntime")]))
    assert text.startswith(
        "The variant `baseline` 11.35% (pytorch, onnxruntime) is at chance level: guessing scores "
        "10.00% with 10 classes and it scores at most 5 pp above that. It learned nothing: do not ship it."
    )
    for advice in ("more epochs", "`optimizer.lr`", "`init:`", "`model.weights`", "`bn_adapt_batches`"):
        assert advice in text
    assert warning([]) is None


# ---------------------------------------------------------------- the gate


def test_min_above_chance_gate_passes_fails_and_needs_the_number_of_classes():
    rules = [GateRule.model_validate({"min_above_chance_pp": 20})]
    rows = [row("baseline", 0.95), row("flat", 0.1135), {**row("bare", 0.9), "per_class_accuracy": None}]
    out = {o.variant: o for o in evaluate(rules, rows)}
    assert out["baseline"].status == "passed" and out["baseline"].value == pytest.approx(85.0)
    assert out["flat"].status == "failed" and out["flat"].message == (
        "accuracy above chance 1.35 pp < min 20.00 pp (accuracy 11.35%, chance 10.00% with 10 classes)"
    )
    assert out["bare"].status == "failed" and "number of classes is unknown" in out["bare"].message


def test_recommendations_skip_a_variant_at_chance_and_name_nothing_when_the_baseline_is():
    rows = [row("baseline", 0.98, size_bytes=1000, accuracy_delta_pp=0.0),
            row("baseline.int8", 0.11, size_bytes=250, accuracy_delta_pp=-87.0)]  # fmt: skip
    page = build_page(ReportInputs(results=rows, tolerance_pp=100.0, charts=False))
    assert {r["variant"] for r in page["summary"]["recommendations"]} == {"baseline"}
    assert page["warnings"][0].startswith("The variant `baseline.int8` 11.00% (pytorch) is at chance")
    flat = [{**r, "accuracy": 0.1} for r in rows]
    page = build_page(ReportInputs(results=flat, tolerance_pp=100.0, charts=False))
    assert page["summary"]["recommendations"] == []
    assert page["summary"]["headline"].startswith(
        "Nothing to recommend: the baseline `baseline` is at chance"
    )
    markdown = render_markdown(page)
    assert markdown.split("\n")[4].startswith("> ⚠ **These variants are at chance level")
    assert markdown.count("These variants are at chance level") == 1  # not again among the warnings


# ---------------------------------------------------------------- real runs through the CLI

# lr 1e-7: one epoch moves no weight, so the baseline stays as initialised (~6-11 % on MNIST)
CHANCE_PIPELINE = TINY_PIPELINE.replace("lr: 0.05}", "lr: 1.0e-7}") + BENCH
assert "lr: 1.0e-7}" in CHANCE_PIPELINE
GATE = "  - stage: gates\n    rules:\n      - min_above_chance_pp: 20\n"
REPORT = "  - stage: report\n"
BENCHMARK = PYTORCH_BENCHMARK


@pytest.fixture(scope="module")
def chance_run(tmp_path_factory, data_root):
    """The run with the gate (exit 1), then the same run without it (every stage but the report
    cached): the pages, summary.md and results of the first, the outputs of both."""
    cwd = tmp_path_factory.mktemp("chance")
    gated = run_cli(
        write_pipeline(cwd, CHANCE_PIPELINE + GATE + REPORT, "chance"), "-q", cwd=cwd, data_root=data_root
    )
    reports = cwd / "reports" / "chance"
    first = {
        "html": (reports / "latest.html").read_text(encoding="utf-8"),
        "markdown": (reports / "summary.md").read_text(encoding="utf-8"),
        "gates": json.loads((reports / "gates.json").read_text()),
        "results": json.loads((reports / "results.json").read_text()),
    }
    ungated = run_cli(
        write_pipeline(cwd, CHANCE_PIPELINE + REPORT, "chance"), "-q", cwd=cwd, data_root=data_root
    )
    return {"gated": gated, "ungated": ungated, **first}


def expected_variants(results):
    """`baseline` 6.20% (pytorch, onnxruntime), ... as the warning lists them (runtimes that score
    the same share one figure)."""
    shown = {}
    for r in results:
        shown.setdefault(r["variant"], {}).setdefault(f"{100 * r['accuracy']:.2f}%", []).append(r["runtime"])
    return {
        name: f"`{name}` " + "; ".join(f"{a} ({', '.join(rts)})" for a, rts in by.items())
        for name, by in shown.items()
    }


@pytest.mark.slow
def test_the_baseline_really_learned_nothing(chance_run):
    rows = chance_run["results"]
    assert {(r["variant"], r["runtime"]) for r in rows} == {
        (v, rt) for v in ("baseline", "pruned") for rt in ("pytorch", "onnxruntime")
    }
    for r in rows:
        assert r["status"] == "ok" and len(r["per_class_accuracy"]) == 10
        assert r["accuracy"] <= 0.15, r  # within the margin of 10 %, or below it


@pytest.mark.slow
def test_the_closing_summary_ends_with_one_warning_naming_each_variant(chance_run):
    out = chance_run["gated"].stdout
    assert out.count("WARNING:") == 1
    line = next(line for line in out.splitlines() if line.startswith("WARNING:"))
    assert line.startswith(
        "WARNING: These variants are at chance level (guessing scores 10.00% with 10 classes"
    )
    for shown in expected_variants(chance_run["results"]).values():
        assert shown in line
    assert "The training loss of `baseline` never fell below 0.9 x ln(10) = 2.07" in line
    assert "do not ship them" in line and "`optimizer.lr`" in line
    summary_txt = next((chance_run["gated"].cwd / "artifacts" / "chance").glob("*/summary.txt")).read_text()
    assert line in summary_txt


@pytest.mark.slow
def test_the_warning_opens_the_page_and_summary_md(chance_run):
    html, markdown = chance_run["html"], chance_run["markdown"]
    sections = re.findall(r'<section id="([^"]+)"', html)
    assert sections[:2] == ["at-chance", "summary"]
    top = html[html.index('<section id="at-chance"') : html.index('<section id="summary"')]
    assert "These variants are at chance level" in top and "<code>baseline</code>" in top
    lines = markdown.splitlines()  # failures lead, then the warnings, the alarm first
    warnings = lines.index("## Warnings")
    assert lines.index("## Failed gates") < warnings < lines.index("## Summary")
    assert next(line for line in lines[warnings + 1 :] if line).startswith(
        "> ⚠ **These variants are at chance level"
    )
    assert markdown.count("These variants are at chance level") == 1


@pytest.mark.slow
def test_no_recommendation_names_a_variant_at_chance(chance_run):
    html, markdown = chance_run["html"], chance_run["markdown"]
    assert "data-objective" not in html and "Ship `" not in markdown and "Within " not in markdown
    assert "**Nothing to recommend: the baseline `baseline` is at chance level" in markdown
    assert "Hand the edge team" not in markdown


@pytest.mark.slow
def test_the_chance_gate_fails_the_run_and_without_it_the_run_exits_0(chance_run):
    gated, ungated = chance_run["gated"], chance_run["ungated"]
    assert gated.returncode == 1, gated.output
    assert "4 quality gate(s) failed" in gated.stderr and "Traceback" not in gated.output
    base = next(r for r in chance_run["results"] if (r["variant"], r["runtime"]) == ("baseline", "pytorch"))
    above = 100 * base["accuracy"] - 10
    message = (
        f"accuracy above chance {above:.2f} pp < min 20.00 pp "
        f"(accuracy {100 * base['accuracy']:.2f}%, chance 10.00% with 10 classes)"
    )
    assert re.search(
        r"FAIL  min_above_chance_pp\s+baseline \[pytorch\]\s+" + re.escape(message), gated.stdout
    )
    assert (chance_run["gates"]["failed"], chance_run["gates"]["passed"]) == (4, 0)
    assert ungated.returncode == 0, ungated.output
    assert "train            cached" in ungated.stdout and "benchmark        cached" in ungated.stdout
    assert ungated.stdout.count("WARNING: These variants are at chance level") == 1


@pytest.mark.slow
def test_a_healthy_run_has_no_chance_warning(tiny_run, data_root, tmp_path):
    for entry in (tiny_run.cwd / "artifacts" / "tiny" / "cache").glob("train-*"):
        shutil.copytree(entry, tmp_path / "artifacts" / "tiny" / "cache" / entry.name)
    path = write_pipeline(tmp_path, TINY_PIPELINE + BENCHMARK + GATE + REPORT)
    result = run_cli(path, "-q", cwd=tmp_path, data_root=data_root)
    assert result.returncode == 0, result.output
    assert "train            cached" in result.stdout
    assert "WARNING" not in result.output and "at chance" not in result.output
    assert "gates: 1 passed, 0 failed, 0 skipped" in result.stdout and "pass  " not in result.stdout
    reports = tmp_path / "reports" / "tiny"
    html = (reports / "latest.html").read_text(encoding="utf-8")
    assert 'id="at-chance"' not in html and "at chance" not in html and "data-objective" in html
    assert "at chance" not in (reports / "summary.md").read_text(encoding="utf-8")
