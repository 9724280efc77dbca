"""``python -m compress.check``: a results table against a stored reference.

Accuracy drops beyond ``--max-drop`` fail and those within it pass; a variant missing from the
current run fails and a new one does not; latency is compared only on the same CPU model and
thread count; ``--update-baseline`` writes a reference that checks clean; bad files exit 2
with one line."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from compress.check import main
from compress.results import REFERENCE_COLUMNS, columns
from tests.conftest import run_cli

CPU = "Intel(R) Xeon(R) CPU @ 2.20GHz"


def row(variant, runtime="onnxruntime", **values):
    base = dict.fromkeys(columns([1, 64]))
    base.update(
        variant=variant,
        runtime=runtime,
        status="ok",
        accuracy=0.98,
        size_bytes=100_000,
        gzip_bytes=90_000,
        latency_b1_p50_ms=0.5,
        latency_b64_p50_ms=8.0,
        threads=1,
        cpu_model=CPU,
        per_class_accuracy={"0": 1.0},
    )
    base.update(values)
    return base


REFERENCE = [row("baseline"), row("pruned", accuracy=0.975), row("baseline", "pytorch")]


def check(tmp_path, capsys, current, *options, reference=REFERENCE):
    (tmp_path / "current.json").write_text(json.dumps(current))
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    code = main([str(tmp_path / "current.json"), "--baseline", str(tmp_path / "reference.json"), *options])
    return code, capsys.readouterr().out


def test_the_columns_read_are_the_benchmark_tables():
    assert set(REFERENCE_COLUMNS) <= set(columns([1]))


def test_an_accuracy_drop_beyond_the_threshold_fails_and_one_within_passes(tmp_path, capsys):
    within = [row("baseline", accuracy=0.975), row("pruned", accuracy=0.970), row("baseline", "pytorch")]
    code, out = check(tmp_path, capsys, within, "--max-drop", "1.0")
    assert code == 0, out
    assert "accuracy drop 0.50 pp <= max 1.00 pp (reference 98.00% -> 97.50%)" in out
    assert "ok: no regression" in out

    beyond = [row("baseline", accuracy=0.975), row("pruned", accuracy=0.960), row("baseline", "pytorch")]
    code, out = check(tmp_path, capsys, beyond, "--max-drop", "1.0")
    assert code == 1, out
    assert re.search(r"FAIL +accuracy +pruned \[onnxruntime\]", out), out
    assert "accuracy drop 1.50 pp > max 1.00 pp (reference 97.50% -> 96.00%)" in out
    assert "FAILED: 1 regression(s)" in out
    code, out = check(tmp_path, capsys, beyond, "--max-drop", "1.5")
    assert code == 0, out


def test_a_missing_variant_fails_and_a_new_one_is_only_reported(tmp_path, capsys):
    code, out = check(tmp_path, capsys, [row("baseline"), row("baseline", "pytorch"), row("slim")])
    assert code == 1, out
    assert re.search(r"FAIL +missing +pruned \[onnxruntime\]", out), out
    assert re.search(r"skip +new +slim \[onnxruntime\] .*not gated", out), out

    code, out = check(tmp_path, capsys, [*REFERENCE, row("slim", accuracy=0.5)])
    assert code == 0, out
    assert "new, not in the reference (accuracy 50.00%)" in out


def test_a_row_that_broke_fails(tmp_path, capsys):
    broken = [row("baseline"), row("pruned", status="error", error="RuntimeError: boom"), REFERENCE[2]]
    code, out = check(tmp_path, capsys, broken)
    assert code == 1 and "boom" in out, out


def test_latency_is_compared_on_the_same_cpu_and_threads_only(tmp_path, capsys):
    slower = [row("baseline", latency_b1_p50_ms=1.0), row("pruned", accuracy=0.975), REFERENCE[2]]
    code, out = check(tmp_path, capsys, slower, "--max-latency-ratio", "1.5")
    assert code == 1, out
    assert re.search(r"FAIL +latency_b1 ", out) and "latency ratio 2.000x > max 1.500x" in out
    assert "latency not compared" not in out

    other_cpu = [{**r, "cpu_model": "AMD EPYC 7B13"} for r in slower]
    code, out = check(tmp_path, capsys, other_cpu, "--max-latency-ratio", "1.5")
    assert code == 0, out
    assert re.search(r"skip +latency_b1 +baseline", out), out
    assert f"note: latency not compared: the reference was measured on {CPU!r} with 1 thread(s)" in out
    assert "'AMD EPYC 7B13' with 1 thread(s)" in out

    more_threads = [{**r, "threads": 4} for r in slower]
    code, out = check(tmp_path, capsys, more_threads)
    assert code == 0 and "with 4 thread(s)" in out, out


def test_a_bigger_file_fails_the_size_ratio(tmp_path, capsys):
    bigger = [row("baseline"), row("pruned", accuracy=0.975, size_bytes=150_000), REFERENCE[2]]
    code, out = check(tmp_path, capsys, bigger, "--max-size-ratio", "1.2")
    assert code == 1 and "size ratio 1.500x > max 1.200x" in out, out


def test_update_baseline_writes_a_small_reference_that_then_checks_clean(tmp_path, capsys):
    current = tmp_path / "results.json"
    current.write_text(json.dumps(REFERENCE))
    reference = tmp_path / "baselines" / "ci.json"
    assert main([str(current), "--baseline", str(reference), "--update-baseline"]) == 0
    assert "wrote" in capsys.readouterr().out
    written = json.loads(reference.read_text())["rows"]
    assert [(r["variant"], r["runtime"]) for r in written] == [
        ("baseline", "onnxruntime"),
        ("baseline", "pytorch"),
        ("pruned", "onnxruntime"),
    ]
    assert "file" not in written[0] and written[0]["latency_b64_p50_ms"] == 8.0
    assert written[0]["per_class_accuracy"] == {"0": 1.0}  # the class check reads it
    assert [p.name for p in reference.parent.iterdir()] == ["ci.json"]  # no temp file left behind
    junit = tmp_path / "check.xml"
    assert main([str(current), "--baseline", str(reference), "--junit", str(junit)]) == 0
    suite = ET.parse(junit).getroot().find("testsuite")
    # accuracy, classes, size, 2 latencies
    assert suite.get("failures") == "0" and int(suite.get("tests")) == 3 * 5


BAD = [
    ("missing-file", None, ["current.json", "not found"]),
    ("not-json", "{oops", ["not valid JSON"]),
    ("an-object", '{"rows": []}', ["a JSON list of rows", "got a JSON object"]),
    ("list-of-numbers", "[1, 2]", ["row 0 is a JSON number"]),
    ("no-variant", '[{"runtime": "pytorch"}]', ["row 0 has no 'variant'"]),
    ("text-accuracy", '[{"variant": "a", "runtime": "b", "accuracy": "high"}]', ["accuracy is not a number"]),
]


@pytest.mark.parametrize("text, words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_exit_2_with_one_line(tmp_path, capsys, text, words):
    if text is not None:
        (tmp_path / "current.json").write_text(text)
    (tmp_path / "reference.json").write_text(json.dumps(REFERENCE))
    code = main([str(tmp_path / "current.json"), "--baseline", str(tmp_path / "reference.json")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    for word in words:
        assert word in err, err


def test_the_cli_exit_codes(tmp_path):
    (tmp_path / "current.json").write_text(json.dumps([row("baseline"), row("pruned", accuracy=0.9)]))
    result = run_cli("current.json", "--baseline", "missing.json", cwd=tmp_path, module="compress.check")
    assert result.returncode == 2 and "create it with --update-baseline" in result.stderr, result.output
    assert "Traceback" not in result.output
    (tmp_path / "reference.json").write_text(json.dumps(REFERENCE))
    result = run_cli("current.json", "--baseline", "reference.json", cwd=tmp_path, module="compress.check")
    assert result.returncode == 1, result.output
    assert "accuracy drop 7.50 pp > max 1.00 pp" in result.stdout
    assert "missing" in result.stdout  # baseline [pytorch] is not in the current file
