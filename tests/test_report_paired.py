"""The report reads the paired comparison with the baseline, and the run's closing lines are brief.

Hand-built tables where the right answer is known (a class that collapsed into another, an
older table without the paired columns or predictions), then a real small run through the CLI
with its gates: green (the closing lines hold one count line, no "pass" lines), then with an
impossible gate (the failures lead summary.md and the closing lines).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from compress.measure.paired import compare, confusion_change
from compress.report import ReportInputs, build_page, render_html, render_markdown
from compress.report.classes import class_deltas
from compress.report.formatting import runtime_label
from compress.results import load_predictions
from compress.variants import Variant
from tests.conftest import BENCH, TINY_PIPELINE, run_cli, write_pipeline
from tests.test_report import MANIFEST, TableReader, read_page, rows_for

CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three"]
LABELS = np.arange(200) % 4  # 50 images per class


def _predictions() -> dict[str, np.ndarray]:
    """The baseline gets 8 images wrong; ``slim`` breaks 10 of class 2 (all into class 3) and
    fixes 2; ``pruned`` breaks one image of class 0 (into class 1)."""
    base = LABELS.copy()
    base[:8] = (LABELS[:8] + 1) % 4
    slim = base.copy()
    slim[np.flatnonzero(LABELS == 2)[5:15]] = 3
    slim[:2] = LABELS[:2]
    pruned = base.copy()
    pruned[np.flatnonzero(LABELS == 0)[-1]] = 1
    return {"baseline": base, "slim": slim, "pruned": pruned}


def paired_rows() -> tuple[list[dict], dict]:
    """A results table with the paired columns (filled from ``compare``, as the benchmark does)
    in two runtimes, and the predictions as the report stage hands them over."""
    predicted = _predictions()
    sizes = {"baseline": 400_000, "slim": 200_000, "pruned": 300_000}
    rows, kept = [], {}
    for runtime in ("pytorch", "onnxruntime"):
        for name, mine in predicted.items():
            stats = compare(mine, predicted["baseline"], LABELS, CLASSES)
            row = {
                "variant": name, "runtime": runtime, "status": "ok", "is_baseline": name == "baseline",
                "parent": None if name == "baseline" else "baseline", "file": f"exports/{name}.onnx",
                "accuracy": stats.accuracy, "accuracy_delta_pp": 0.0 - stats.drop_pp,
                "test_count": len(LABELS),
                "size_bytes": sizes[name], "size_ratio": sizes[name] / sizes["baseline"],
                "per_class_accuracy": {c: v.accuracy for c, v in stats.classes.items()},
                "accuracy_drop_ci_low_pp": stats.ci_low_pp, "accuracy_drop_ci_high_pp": stats.ci_high_pp,
                "flip_rate": stats.flip_rate, "flips_fixed": stats.fixed, "flips_broken": stats.broken,
                "worst_class": stats.worst_class if name != "baseline" else None,
                "worst_class_drop_pp": stats.worst.drop_pp if name != "baseline" else 0.0,
                "worst_class_drop_ci_low_pp": stats.worst.ci_low_pp if name != "baseline" else 0.0,
                "worst_class_drop_ci_high_pp": stats.worst.ci_high_pp if name != "baseline" else 0.0,
                "class_drop_pp": {c: v.drop_pp for c, v in stats.classes.items()},
                "paired_confidence": 0.95,
            }  # fmt: skip
            rows.append(row)
            kept[f"{name}@{runtime}"] = mine.tolist()
    return rows, {"labels": LABELS.tolist(), "classes": CLASSES, "rows": kept}


def cells_of(html: str) -> dict[tuple[str, str], dict[str, tuple[str, str]]]:
    reader = TableReader()
    reader.feed(html)
    return {(r["variant"][0], r["runtime"][0]): r for r in reader.rows if r}


def test_the_table_shows_each_drop_with_its_interval_the_flips_and_the_worst_class():
    rows, predictions = paired_rows()
    page = build_page(ReportInputs(results=rows, manifest=MANIFEST, predictions=predictions, charts=False))
    keys = [c["key"] for c in page["columns"]]
    assert keys[5:8] == ["accuracy_delta_pp", "flip_rate", "worst_class_drop_pp"]
    slim = next(r for r in rows if (r["variant"], r["runtime"]) == ("slim", "onnxruntime"))
    low, high = -slim["accuracy_drop_ci_high_pp"], -slim["accuracy_drop_ci_low_pp"]
    assert low < slim["accuracy_delta_pp"] < high < 0  # 8 of 200 images net: a real loss
    interval = f"95 % CI {low:+.2f} to {high:+.2f}"
    worst = f"2 - two {-slim['worst_class_drop_pp']:+.2f} pp"
    assert slim["worst_class_drop_pp"] == pytest.approx(20.0)  # 10 of the class's 50 images

    cells = cells_of(render_html(page))[("slim", "onnxruntime")]
    assert cells["accuracy_delta_pp"][1] == f"{slim['accuracy_delta_pp']:+.2f} pp ({interval})"
    assert cells["flip_rate"][1] == "6.0 % (2 fixed, 10 broken)"
    assert cells["worst_class_drop_pp"][1].startswith(worst + " (95 % CI ")
    base = cells_of(render_html(page))[("baseline", "onnxruntime")]
    assert (base["accuracy_delta_pp"][1], base["flip_rate"][1], base["worst_class_drop_pp"][1]) == (
        "+0.00 pp",
        "–",
        "–",
    )

    markdown = render_markdown(page)
    line = next(x for x in markdown.splitlines() if x.startswith("| slim | onnxruntime |"))
    assert f"({interval}) | 6.0 % (2 fixed, 10 broken) | {worst}" in line
    # the summary: the interval of the headline's cost, and the flips of each recommendation
    assert "95 % CI of the loss" in page["summary"]["headline"]
    sentences = [r["sentence"] for r in page["summary"]["recommendations"] if r["variant"] != "baseline"]
    assert sentences and all("% of predictions flipped" in s and "95 % CI" in s for s in sentences)


def test_the_per_class_chart_and_the_confusion_change_of_the_recommended_or_the_worst_variant():
    rows, predictions = paired_rows()
    runtime, classes, deltas = class_deltas(rows, "baseline")
    assert (runtime, classes, sorted(deltas)) == ("onnxruntime", CLASSES, ["pruned", "slim"])
    assert deltas["slim"]["2 - two"] == pytest.approx(-20.0) and deltas["pruned"][
        "0 - zero"
    ] == pytest.approx(-2.0)
    page = build_page(
        ReportInputs(results=rows, manifest=MANIFEST, predictions=predictions, tolerance_pp=1.0)
    )
    chart = next(c for c in page["charts"] if c["title"] == "Per-class accuracy change (onnxruntime)")
    assert chart["kind"] == "heatmap" and "50 test images per class" in chart["caption"]

    # pruned (0.5 pp lost, smaller) is the recommended file; its one broken image went 0 -> 1
    confusion = page["confusion"]
    assert (confusion["variant"], confusion["runtime"], confusion["why"]) == (
        "pruned",
        "onnxruntime",
        "the recommended variant",
    )
    assert confusion["cells"] == [[{"count": 1, "heavy": False}]]
    assert (confusion["true"], confusion["predicted"]) == (["0 - zero"], ["1 - one"])

    # nothing within 0 pp: the variant that lost most, slim, whose class 2 collapsed into class 3
    strict = build_page(
        ReportInputs(results=rows, manifest=MANIFEST, predictions=predictions, tolerance_pp=0.0)
    )
    confusion = strict["confusion"]
    assert (confusion["variant"], confusion["why"]) == ("slim", "the variant that lost most accuracy")
    assert (confusion["true"], confusion["predicted"]) == (["2 - two"], ["3 - three"])
    assert confusion["cells"] == [[{"count": 10, "heavy": True}]] and confusion["moves"] == [
        ("2 - two", "3 - three", 10)
    ]
    assert confusion["sentence"].startswith(
        "Of the 200 test images, `slim` (onnxruntime, the variant that lost most accuracy) gets 10 wrong "
        "that the baseline got right and 2 right that the baseline got wrong."
    )
    html = render_html(strict)
    assert 'id="confusion-change"' in html and 'data-count="10"' in html and 'href="#confusion"' in html
    assert "`2 - two` → `3 - three` (10)" in render_markdown(strict)


def test_an_older_results_table_without_paired_columns_or_predictions_still_renders():
    # the hand-built table has neither the paired columns nor per-class accuracy
    page = build_page(ReportInputs(results=rows_for(), manifest=MANIFEST))
    assert not {"flip_rate", "worst_class_drop_pp"} & {c["key"] for c in page["columns"]}
    assert not any("Per-class" in c["title"] for c in page["charts"])
    assert page["confusion"]["missing"].startswith("Predictions not recorded")
    html = render_html(page)
    assert "Predictions not recorded" in html and 'id="confusion-change"' not in html
    assert "95 % CI" not in html and "95 % CI" not in render_markdown(page)
    # a recorded run of an older benchmark (tests/snapshots): per-class accuracy, no paired columns
    data = json.loads(
        (Path(__file__).parent / "snapshots" / "report_inputs.json").read_text(encoding="utf-8")
    )
    for row in data["results"]:
        for key in [
            k for k in row if k.startswith(("accuracy_drop_ci", "flip", "worst_class", "class_drop"))
        ]:
            del row[key]
    data["variants"] = {n: Variant(**{**v, "file": Path(v["file"])}) for n, v in data["variants"].items()}
    data["predictions"] = None
    page = build_page(ReportInputs(**data))
    assert any(c["title"].startswith("Per-class accuracy change") for c in page["charts"])
    assert page["confusion"]["missing"].startswith("Predictions not recorded")
    assert '<table id="results"' in render_html(page) and "## Results" in render_markdown(page)


# ---------------------------------------------------------------- a real run through the CLI

GATES = """\
  - stage: gates
    rules:
      - {name: not-worse-by-half, max_accuracy_drop: 50}
      - {name: floor, min_accuracy: 0.5}
  - stage: report
"""


@pytest.fixture(scope="module")
def gated_run(tiny_run, data_root, tmp_path_factory):
    """The tiny baseline pruned, exported, benchmarked, gated and reported: green, then again
    with the floor raised to 99.9 % (only the gates and the report re-run)."""
    cwd = tmp_path_factory.mktemp("paired")
    for entry in (tiny_run.cwd / "artifacts" / "tiny" / "cache").glob("train-*"):
        shutil.copytree(entry, cwd / "artifacts" / "tiny" / "cache" / entry.name)
    pipeline = write_pipeline(cwd, TINY_PIPELINE + BENCH + GATES)
    green = run_cli(pipeline, cwd=cwd, data_root=data_root)
    reports = cwd / "reports" / "tiny"
    first = {
        "html": (reports / "latest.html").read_text(encoding="utf-8"),
        "results": json.loads((reports / "results.json").read_text()),
        "gates": json.loads((reports / "gates.json").read_text()),
        "summary": (reports / "summary.md").read_text(encoding="utf-8"),
    }
    red = run_cli(pipeline, "--set", "gates.rules[1].min_accuracy=0.999", cwd=cwd, data_root=data_root)
    return {"green": green, "red": red, "reports": reports, **first}


@pytest.mark.slow
def test_the_report_of_a_real_run_shows_intervals_flips_worst_class_and_the_confusion_change(gated_run):
    assert gated_run["green"].returncode == 0, gated_run["green"].output
    reports, rows = gated_run["reports"], gated_run["results"]
    html = gated_run["html"]
    cells = cells_of(html)
    for row in rows:
        shown = cells[(row["variant"], row["runtime"])]
        if row["is_baseline"]:
            assert shown["flip_rate"][1] == "–" and "CI" not in shown["accuracy_delta_pp"][1]
            continue
        interval = (
            f"95 % CI {-row['accuracy_drop_ci_high_pp']:+.2f} to {-row['accuracy_drop_ci_low_pp']:+.2f}"
        )
        assert shown["accuracy_delta_pp"][1] == f"{row['accuracy_delta_pp']:+.2f} pp ({interval})"
        assert shown["flip_rate"][1] == (
            f"{100 * row['flip_rate']:.1f} % ({row['flips_fixed']} fixed, {row['flips_broken']} broken)"
        )
        if row["worst_class_drop_pp"] > 0:
            assert shown["worst_class_drop_pp"][1].startswith(
                f"{row['worst_class']} {-row['worst_class_drop_pp']:+.2f} pp"
            )
    assert 'alt="Per-class accuracy change (onnxruntime)"' in html
    assert len(read_page(reports / "latest.html").images) >= 5

    # the confusion change of pruned, recomputed from the predictions the benchmark published
    section = html[
        html.index('<section id="confusion">') : html.index("</section>", html.index('id="confusion"'))
    ]
    found = re.search(r"<code>pruned</code> \(([^,]+), [^)]*\) gets (\d+) wrong", section)
    assert found, section
    runtime = next(r for r in ("onnxruntime", "pytorch") if runtime_label(r) == found.group(1))
    kept = load_predictions(reports / "predictions.npz")
    mine, reference = kept.get("pruned", runtime), kept.get("baseline", runtime)
    matrix = confusion_change(mine, reference, kept.labels, len(kept.classes))
    assert int(found.group(2)) == matrix.sum()
    shown = [int(n) for n in re.findall(r'data-count="(\d+)"', section)]
    assert sum(shown) == matrix.sum() and sorted(n for n in shown if n) == sorted(matrix[matrix > 0].tolist())


@pytest.mark.slow
def test_a_green_run_closes_with_one_count_line_and_no_pass_lines(gated_run):
    out = gated_run["green"].stdout
    gates = gated_run["gates"]
    assert gates["failed"] == 0 and gates["passed"] > 4
    assert "pass  " not in out and "FAIL" not in out
    assert [line for line in out.splitlines() if line.startswith("gates")] == [
        f"gates: {gates['passed']} passed, 0 failed, 0 skipped"
    ]
    summary = gated_run["summary"]
    assert "## Failed gates" not in summary
    assert summary.splitlines()[2].endswith(f"Quality gates: {gates['passed']} passed, 0 failed.")


@pytest.mark.slow
def test_a_failing_gate_leads_the_closing_lines_and_summary_md(gated_run):
    red = gated_run["red"]
    assert red.returncode == 1, red.output
    reports = gated_run["reports"]
    gates = json.loads((reports / "gates.json").read_text())
    failed = [r for r in gates["results"] if r["status"] == "failed"]
    assert gates["failed"] == len(failed) == 4  # every row is below 99.9 %
    out = red.stdout.splitlines()
    start = out.index(f"gates: {gates['passed']} passed, 4 failed, 0 skipped")
    assert [line.split()[:2] for line in out[start + 1 : start + 5]] == [["FAIL", "floor"]] * 4
    assert "pass  " not in red.stdout and "quality gate(s) failed" in red.stderr
    for result in failed:
        assert result["message"] in red.stdout

    lines = (reports / "summary.md").read_text(encoding="utf-8").splitlines()
    assert lines[4:7] == [
        "## Failed gates",
        "",
        f"4 of {gates['total']} quality gates failed ({gates['passed']} passed, 0 skipped):",
    ]
    bullets = lines[8:12]
    assert all(b.startswith("- ❌ floor: ") for b in bullets) and lines[12] == ""
    for bullet, result in zip(bullets, failed, strict=True):
        assert f"{result['variant']} [{result['runtime']}]" in bullet and result["message"] in bullet
    html = (reports / "latest.html").read_text(encoding="utf-8")
    assert 'id="failed-gates"' in html and "4 of" in html and "quality gates failed: see" in html
