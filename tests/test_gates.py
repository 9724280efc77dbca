"""Quality gates: each rule on hand-made benchmark rows, the YAML schema's errors, and a real
tiny pipeline whose impossible gate makes the CLI exit 1 with a JUnit failure naming both
numbers (also when every stage before the gates is cached)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest

from compress import gating
from compress.config import load_pipeline
from compress.gating import GateRule, evaluate
from compress.results import columns
from compress.run import main
from compress.stages import config_registry
from tests.conftest import BENCH, TINY_PIPELINE, run_cli, write_pipeline


def row(variant, runtime="pytorch", **values):
    base = {
        "variant": variant,
        "runtime": runtime,
        "status": "ok",
        "error": None,
        "accuracy": 0.98,
        "size_bytes": 1000,
        "gzip_bytes": 900,
        "sparsity": 0.0,
        "latency_b1_p50_ms": 1.0,
        "latency_b64_p50_ms": 10.0,
        "export_ok": None if runtime == "pytorch" else True,
        "parity_max_abs_diff": None if runtime == "pytorch" else 1e-6,
        "parity_top1_agreement": None if runtime == "pytorch" else 1.0,
        "threads": 1,
        "cpu_model": "Test CPU",
    }
    return {**base, **values}


ROWS = [
    row("baseline"),
    row("baseline", "onnxruntime", latency_b1_p50_ms=0.5),
    row("pruned", accuracy=0.975, sparsity=0.8, gzip_bytes=300),
    row("pruned", "onnxruntime", accuracy=0.975, sparsity=0.8, latency_b1_p50_ms=0.6, gzip_bytes=310),
    row("pruned.int8", "onnxruntime", accuracy=0.95, size_bytes=260, latency_b1_p50_ms=0.4),
    row("student.scratch", accuracy=0.5),
]


def rules(*specs):
    return [GateRule.model_validate(spec) for spec in specs]


def by_case(outcomes):
    return {(o.gate, o.variant, o.runtime): o for o in outcomes}


def test_the_rows_use_the_benchmark_tables_column_names():
    assert set(row("x")) <= set(columns([1, 64]))


def test_accuracy_drop_is_per_runtime_against_the_baseline_and_skips_scratch_controls():
    out = by_case(evaluate(rules({"max_accuracy_drop": 1.0}), ROWS))
    assert set(out) == {
        ("max_accuracy_drop", "pruned", "pytorch"),
        ("max_accuracy_drop", "pruned", "onnxruntime"),
        ("max_accuracy_drop", "pruned.int8", "onnxruntime"),
    }  # the baseline is not compared with itself; student.scratch is a control, not shipped
    passed = out[("max_accuracy_drop", "pruned", "pytorch")]
    assert passed.status == "passed" and passed.value == pytest.approx(0.5)
    failed = out[("max_accuracy_drop", "pruned.int8", "onnxruntime")]
    assert failed.status == "failed" and failed.value == pytest.approx(3.0)
    assert "3.00 pp > max 1.00 pp" in failed.message and "98.00% -> 95.00%" in failed.message


def test_listed_scratch_control_is_gated():
    out = evaluate(rules({"min_accuracy": 0.9, "variants": ["student.scratch"]}), ROWS)
    assert [(o.variant, o.status) for o in out] == [("student.scratch", "failed")]
    assert "50.00% < min 90.00%" in out[0].message


def test_each_metric_passes_and_fails_on_its_own_number():
    cases = [
        ({"min_accuracy": 0.96, "variants": ["pruned.int8"]}, "failed", 0.95),
        ({"min_accuracy": 0.95, "variants": ["pruned.int8"]}, "passed", 0.95),
        ({"max_size_ratio": 0.25, "variants": ["pruned.int8"]}, "failed", 0.26),
        ({"max_size_ratio": 0.3, "variants": ["pruned.int8"]}, "passed", 0.26),
        ({"max_gzip_ratio": 0.3, "variants": ["pruned"], "runtime": "pytorch"}, "failed", 300 / 900),
        ({"max_gzip_ratio": 0.34, "variants": ["pruned"], "runtime": "pytorch"}, "passed", 300 / 900),
        ({"min_sparsity": 0.81, "variants": ["pruned"], "runtime": "pytorch"}, "failed", 0.8),
        ({"min_sparsity": 0.8, "variants": ["pruned"], "runtime": "pytorch"}, "passed", 0.8),
        ({"max_latency_ratio": 1.1, "variants": ["pruned"], "runtime": "onnxruntime"}, "failed", 1.2),
        ({"max_latency_ratio": 1.2, "variants": ["pruned"], "runtime": "onnxruntime"}, "passed", 1.2),
        (
            {"max_latency_ratio": 1.0, "variants": ["pruned"], "runtime": "onnxruntime", "batch_size": 64},
            "passed",
            1.0,
        ),
    ]
    for spec, status, value in cases:
        [outcome] = evaluate(rules(spec), ROWS)
        assert (outcome.status, outcome.value) == (status, pytest.approx(value)), (spec, outcome)


def test_against_another_variant_compares_in_the_same_runtime_only():
    out = evaluate(rules({"max_accuracy_drop": 1.0, "variants": ["pruned.int8"], "against": "pruned"}), ROWS)
    assert [(o.status, round(o.value, 6)) for o in out] == [("failed", 2.5)]
    # pruned.int8 has no pytorch row, pruned has no torchscript row: both are failures, not passes
    out = evaluate(
        rules(
            {"max_latency_ratio": 2, "variants": ["pruned.int8"], "against": "pruned", "runtime": "pytorch"}
        ),
        ROWS,
    )
    assert [(o.status, o.message) for o in out] == [("failed", "no benchmark row for pytorch")]
    rows = [r for r in ROWS if not (r["variant"] == "baseline" and r["runtime"] == "onnxruntime")]
    out = by_case(evaluate(rules({"max_accuracy_drop": 5}), rows))
    lost = out[("max_accuracy_drop", "pruned", "onnxruntime")]
    assert lost.status == "failed" and "'baseline' has no row in onnxruntime" in lost.message
    assert out[("max_accuracy_drop", "pruned", "pytorch")].status == "passed"


def test_unmeasured_rows_and_failed_parity_fail():
    rows = ROWS + [
        row("slim", status="error", error="RuntimeError: boom", accuracy=None),
        row(
            "slim", "onnxruntime", status="export_failed", export_ok=False, error="parity 0.9", accuracy=None
        ),
    ]
    out = by_case(evaluate(rules({"min_accuracy": 0.5}, {"require_parity": True}), rows))
    assert out[("min_accuracy", "slim", "pytorch")].status == "failed"
    assert "boom" in out[("min_accuracy", "slim", "pytorch")].message
    parity = out[("require_parity", "slim", "onnxruntime")]
    assert parity.status == "failed" and "parity 0.9" in parity.message
    assert out[("require_parity", "pruned", "onnxruntime")].status == "passed"
    assert ("require_parity", "pruned", "pytorch") not in out  # eager rows have no export parity


def test_float_noise_does_not_fail_a_gate_and_close_numbers_never_print_equal():
    rows = [row("baseline", accuracy=0.981), row("pruned", accuracy=0.971)]
    [outcome] = evaluate(rules({"max_accuracy_drop": 1.0}), rows)
    assert 100 * (0.981 - 0.971) != 1.0  # the noise: measure.rules.drop_pp rounds it away
    assert outcome.value == 1.0 and outcome.status == "passed"
    rows = [row("baseline", accuracy=0.98104), row("pruned", accuracy=0.971)]
    [outcome] = evaluate(rules({"max_accuracy_drop": 1.0}), rows)
    assert outcome.status == "failed" and "1.004 pp > max 1.000 pp" in outcome.message


def test_a_rule_matching_nothing_is_reported_as_skipped():
    out = evaluate(rules({"max_accuracy_drop": 1.0}), [row("baseline")])
    assert [(o.status, o.message) for o in out] == [("skipped", "no benchmarked variant matches this rule")]


def test_junit_xml_has_one_case_per_outcome_with_failures_carrying_both_numbers():
    outcomes = evaluate(rules({"max_accuracy_drop": 1.0, "name": "drop<1pp"}), ROWS)
    root = ET.fromstring(gating.junit_xml(outcomes, "demo.gates", {"run_id": "r1"}))
    suite = root.find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"pruned [pytorch]", "pruned [onnxruntime]", "pruned.int8 [onnxruntime]"}
    failure = cases["pruned.int8 [onnxruntime]"].find("failure")
    assert cases["pruned.int8 [onnxruntime]"].get("classname") == "demo.gates.drop<1pp"
    assert "3.00 pp" in failure.get("message") and "1.00 pp" in failure.get("message")
    assert cases["pruned [pytorch]"].find("failure") is None


# ---------------------------------------------------------------- the YAML schema


def validate(tmp_path, capsys, gates, bench=BENCH):
    path = write_pipeline(tmp_path, TINY_PIPELINE + bench + gates)
    code = main([str(path), "--validate"])
    return code, capsys.readouterr().err


BAD_GATES = [
    (
        "misspelt-metric",
        "rules:\n      - max_acuracy_drop: 1",
        ["rules[0].max_acuracy_drop", "'max_accuracy_drop'"],
    ),
    ("no-metric", "rules:\n      - variants: all", ["rules[0]", "exactly one gate", "has none"]),
    (
        "two-metrics",
        "rules:\n      - {min_accuracy: 0.9, min_sparsity: 0.1}",
        ["has 2: min_accuracy, min_sparsity"],
    ),
    ("percent-accuracy", "rules:\n      - min_accuracy: 97", ["rules[0].min_accuracy", "0.97 for 97%"]),
    (
        "unknown-variant",
        "rules:\n      - {min_accuracy: 0.9, variants: [prunned]}",
        ["rules[0].variants", "'pruned'"],
    ),
    (
        "unknown-against",
        "rules:\n      - {max_accuracy_drop: 1, against: base}",
        ["rules[0].against", "'base'"],
    ),
    ("unmeasured-runtime", "rules:\n      - {min_accuracy: 0.9, runtime: torchscript}", ["rules[0].runtime"]),
    ("untimed-batch", "rules:\n      - {max_latency_ratio: 2, batch_size: 64}", ["rules[0].batch_size", "1"]),
    ("dense-sparsity", "rules:\n      - min_sparsity: 0.5", ["min_sparsity needs the pruned variants"]),
    ("no-rules", "rules: []", ["(gates).rules"]),
    ("unknown-benchmark", "benchmark: bench\n    rules:\n      - min_accuracy: 0.5", ["gates).benchmark"]),
]


@pytest.mark.parametrize("gates, words", [c[1:] for c in BAD_GATES], ids=[c[0] for c in BAD_GATES])
def test_bad_gate_config_is_exit_2_naming_the_key(tmp_path, capsys, gates, words):
    code, err = validate(tmp_path, capsys, "  - stage: gates\n    " + gates + "\n")
    assert code == 2, err
    assert "stages[4] (gates)" in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_gates_need_a_benchmark_before_them(tmp_path, capsys):
    code, err = validate(
        tmp_path, capsys, "  - stage: gates\n    rules:\n      - min_accuracy: 0.5\n", bench=""
    )
    assert code == 2 and "stages[1] (gates)" in err and "add '- stage: benchmark'" in err, err


def test_require_parity_needs_an_export_stage(tmp_path, capsys):
    bench = BENCH.replace("  - stage: export\n    formats: [onnx]\n    parity_samples: 64\n", "")
    code, err = validate(
        tmp_path, capsys, "  - stage: gates\n    rules:\n      - require_parity: true\n", bench
    )
    assert code == 2 and "no export stage" in err, err


def test_comparisons_default_to_the_benchmarks_baseline_and_one_name_needs_no_list(tmp_path):
    bench = BENCH.replace(
        "    runtimes: [pytorch, onnxruntime]\n",
        "    runtimes: [pytorch, onnxruntime]\n    baseline: pruned\n",
    )
    gates = "  - stage: gates\n    rules:\n      - {max_accuracy_drop: 1, variants: baseline}\n"
    gates += "      - min_accuracy: 0.5\n"
    pipeline = load_pipeline(write_pipeline(tmp_path, TINY_PIPELINE + bench + gates), config_registry())
    cfg = pipeline.stages[-1]
    drop, floor = cfg.resolved_rules()
    assert (drop.against, drop.variants, floor.against) == ("pruned", ["baseline"], None)
    assert cfg.consumes(["baseline", "pruned"]) == ["baseline", "pruned"]


# ---------------------------------------------------------------- a real run through the CLI

GATES = """\
  - stage: gates
    rules:
      - name: impossible
        max_accuracy_drop: -50
      - max_accuracy_drop: 5
      - min_sparsity: 0.45
        variants: [pruned]
      - require_parity: true
"""


@pytest.mark.slow
def test_an_impossible_gate_fails_the_run_with_both_numbers_in_junit(tmp_path, tiny_run, data_root, capsys):
    # reuse the session's trained baseline: same pipeline name and train settings, so a cache hit
    for entry in (tiny_run.cwd / "artifacts" / "tiny" / "cache").glob("train-*"):
        shutil.copytree(entry, tmp_path / "artifacts" / "tiny" / "cache" / entry.name)
    path = write_pipeline(tmp_path, TINY_PIPELINE + BENCH + GATES)
    result = run_cli(path, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 1, result.output
    assert "train            cached" in result.stdout
    assert "quality gate(s) failed" in result.stderr and "Traceback" not in result.output

    reports = tmp_path / "reports" / "tiny"
    table = {(r["variant"], r["runtime"]): r for r in json.loads((reports / "results.json").read_text())}
    drop = {
        rt: 100 * (table[("baseline", rt)]["accuracy"] - table[("pruned", rt)]["accuracy"])
        for rt in ("pytorch", "onnxruntime")
    }
    gates = json.loads((reports / "gates.json").read_text())
    assert (gates["failed"], gates["passed"], gates["skipped"]) == (2, 6, 0)

    suite = ET.parse(reports / "gates.xml").getroot().find("testsuite")
    assert suite.get("tests") == "8" and suite.get("failures") == "2"
    failures = {
        c.get("name"): c.find("failure").get("message")
        for c in suite.iter("testcase")
        if c.get("classname") == "tiny.gates.impossible"
    }
    assert set(failures) == {"pruned [pytorch]", "pruned [onnxruntime]"}
    for runtime, message in [
        ("pytorch", failures["pruned [pytorch]"]),
        ("onnxruntime", failures["pruned [onnxruntime]"]),
    ]:
        # with the benchmark's predictions every drop states its paired interval
        assert f"accuracy drop {drop[runtime]:.2f} pp (95 % CI " in message and ") > max -50.00 pp" in message
    passed = [c for c in suite.iter("testcase") if c.find("failure") is None and c.find("skipped") is None]
    assert len(passed) == 6
    sparsity = next(r for r in gates["results"] if r["metric"] == "min_sparsity")
    assert (
        sparsity["value"] == pytest.approx(table[("pruned", "pytorch")]["sparsity"])
        and sparsity["value"] > 0.45
    )
    # the closing lines: one count line and only the failures (every outcome is in gates.json)
    assert "gates: 6 passed, 2 failed, 0 skipped" in result.stdout and "pass  " not in result.stdout
    assert result.stdout.count("FAIL  impossible") == 2

    # every stage cached (in-process, to save a Python start-up): the gates still fail the run, and
    # relaxing the impossible gate re-runs only the gates and passes
    where = ["--artifacts", str(tmp_path / "artifacts"), "--reports", str(tmp_path / "reports")]
    where += ["--data-root", str(data_root)]
    assert main([str(path), *where]) == 1
    out = capsys.readouterr().out
    assert "benchmark        cached" in out and "FAIL  impossible" in out
    assert main([str(path), *where, "--set", "gates.rules[0].max_accuracy_drop=100"]) == 0
    out = capsys.readouterr().out
    assert "benchmark        cached" in out and "8 passed, 0 failed" in out
    assert json.loads((reports / "gates.json").read_text())["failed"] == 0
