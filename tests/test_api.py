"""``compress.run_pipeline``: the CLI's run from Python. One real tiny run from a dict (train,
prune, export, benchmark, gates) whose table, gates and bundle are the files the run wrote;
bad input, a failed gate and a crashed stage raise the typed error with the CLI's message and
exit code, never SystemExit; the caller's logging, working directory and threads survive."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

import compress
from compress import api
from compress.engine import StageFailed
from compress.errors import ConfigError, DataError, GateFailure
from compress.run import main
from tests.conftest import BENCH, TINY_PIPELINE, finish_cli, start_cli

CORPUS = Path(__file__).parent / "bad_inputs"
GATES = "  - stage: gates\n    rules:\n      - max_accuracy_drop: 5\n      - require_parity: true\n"


def _caller_state() -> dict[str, Any]:
    root = logging.getLogger()
    return {
        "root_level": root.level,
        "handlers": [(handler, handler.level) for handler in root.handlers],
        "cwd": os.getcwd(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }


@dataclass
class ApiRun:
    cwd: Path
    raw: dict[str, Any]
    result: compress.RunResult
    results_json: list[dict[str, Any]]  # as the run left them, before another test runs again
    gates_json: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> ApiRun:
    """The tiny pipeline as a dict, run once from a notebook-like caller: its own log handler
    and root level, a working directory of its own, data.root relative to that directory."""
    cwd = tmp_path_factory.mktemp("api-run")
    raw = yaml.safe_load(TINY_PIPELINE + BENCH + GATES)
    raw["name"] = "tiny"
    raw["data"]["root"] = os.path.relpath(data_root, cwd)
    mine = logging.NullHandler(level=logging.ERROR)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.delenv("COMPRESS_DATA_ROOT", raising=False)  # data.root must be the one used
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)
        root.addHandler(mine)
        try:
            before = _caller_state()
            result = compress.run_pipeline(raw)
            after = _caller_state()
        finally:
            root.removeHandler(mine)
            root.setLevel(level)
    reports = cwd / "reports" / "tiny"
    return ApiRun(
        cwd,
        raw,
        result,
        json.loads((reports / "results.json").read_text()),
        json.loads((reports / "gates.json").read_text()),
        before,
        after,
    )


def test_a_dict_pipeline_returns_the_table_the_run_wrote(api_run: ApiRun) -> None:
    result = api_run.result
    assert isinstance(result.table, pd.DataFrame)
    rows = api_run.results_json
    assert {(r["variant"], r["runtime"]) for r in rows} == {
        (v, rt) for v in ("baseline", "pruned") for rt in ("pytorch", "onnxruntime")
    }
    assert list(result.table.columns) == list(rows[0])
    assert json.loads(result.table.to_json(orient="records")) == rows
    csv = pd.read_csv(result.reports_dir / "results.csv")
    assert list(csv.columns) == list(result.table.columns) and len(csv) == len(result.table)

    # the CLI's defaults, in the caller's working directory
    assert result.run_dir == api_run.cwd / "artifacts" / "tiny" / result.run_dir.name
    assert result.reports_dir == api_run.cwd / "reports" / "tiny"
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["pipeline_file"] == "<dict tiny>"
    assert manifest["data"]["resolved_root"] == str(Path(api_run.cwd, api_run.raw["data"]["root"]).resolve())
    summary_txt = (result.run_dir / "summary.txt").read_text()
    assert result.summary + "\n" == summary_txt and "done: 5 stages" in result.summary


def test_gates_and_the_bundle_are_reported(api_run: ApiRun) -> None:
    gates = api_run.result.gates
    assert gates.passed and gates.failed == 0 and list(gates.by_stage) == ["gates"]
    assert [o.to_json() for o in gates.outcomes] == api_run.gates_json["results"]
    assert len(gates.to_dicts()) == api_run.gates_json["total"] == api_run.gates_json["passed"]
    bundle = api_run.result.bundle
    assert bundle == api_run.result.run_dir / "stages" / "export" / "deploy"
    assert bundle.is_dir() and (bundle / "bundle.json").is_file()


def test_the_callers_logging_cwd_and_threads_are_left_as_they_were(api_run: ApiRun) -> None:
    assert api_run.after == api_run.before
    assert api_run.before["root_level"] == logging.WARNING  # a run raises it to INFO for run.log


def test_a_failing_gate_raises_gate_failure_carrying_the_result(
    api_run: ApiRun, data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(api_run.cwd)
    monkeypatch.delenv("COMPRESS_DATA_ROOT", raising=False)
    impossible = {"gates.rules[0].max_accuracy_drop": -50}
    with pytest.raises(GateFailure) as caught:
        compress.run_pipeline(api_run.raw, overrides=impossible)
    error = caught.value
    assert error.exit_code == 1
    assert str(error) == "2 quality gate(s) failed; see reports/tiny/gates.xml"
    result = error.result
    assert not result.gates.passed and result.gates.failed == 2
    assert {o.variant for o in result.gates.outcomes if o.status == "failed"} == {"pruned"}
    assert "benchmark        cached" in result.summary and "FAIL  max_accuracy_drop" in result.summary
    assert json.loads(result.table.to_json(orient="records")) == api_run.results_json

    # the CLI, on the same pipeline as a file (every stage but the gates cached): same line, same code
    path = api_run.cwd / "tiny.yaml"
    path.write_text(yaml.safe_dump(api_run.raw, sort_keys=False), encoding="utf-8")
    assert main([str(path), "--set", "gates.rules[0].max_accuracy_drop=-50", "-q"]) == error.exit_code
    assert capsys.readouterr().err.endswith(f"error: {error}\n")


# file in tests/bad_inputs/, the CLI's extra arguments, the same given to run_pipeline
BAD = [
    ("yaml_syntax.yaml", [], {}),
    ("misspelt_stage_key.yaml", [], {}),
    ("bad_set_path.yaml", ["--set", "trian.epochs=2"], {"overrides": {"trian.epochs": 2}}),
    ("data_root_missing.yaml", [], {}),
]


def test_bad_input_raises_the_typed_error_with_the_clis_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_env_root = {"COMPRESS_DATA_ROOT": ""}  # data_root_missing's data.root must be the one used
    started = [
        start_cli(CORPUS / name, *args, cwd=tmp_path, env=no_env_root) for name, args, _ in BAD
    ]  # all at once: their seconds of start-up overlap
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COMPRESS_DATA_ROOT", raising=False)
    for (name, _, kwargs), proc in zip(BAD, started, strict=True):
        cli = finish_cli(proc, tmp_path)
        # pytest.raises lets SystemExit through: a sys.exit in the API fails the test
        with pytest.raises(ConfigError if name != "data_root_missing.yaml" else DataError) as caught:
            compress.run_pipeline(CORPUS / name, **kwargs)
        assert caught.value.exit_code == cli.returncode == 2, (name, cli.output)
        assert cli.stderr.endswith(f"error: {caught.value}\n"), (name, cli.stderr)
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "reports").exists()


def test_a_dict_is_named_in_messages_and_left_unchanged() -> None:
    raw = yaml.safe_load(TINY_PIPELINE)
    kept = json.dumps(raw)
    with pytest.raises(ConfigError) as caught:
        compress.run_pipeline(raw, overrides={"train.epochz": 1})
    assert str(caught.value).startswith("<dict>: stages[0] (train).epochz: unknown key")
    assert json.dumps(raw) == kept


def test_a_crashed_stage_raises_stage_failure_and_the_callers_state_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run may change the process (run.log's level, a stage's threads); a crash mid-run too."""
    boom = ValueError("boom")

    def crashing_run(pipeline: object, options: object) -> None:
        os.chdir(tmp_path)
        torch.set_num_threads(torch.get_num_threads() + 1)
        logging.getLogger().setLevel(logging.DEBUG)
        logging.getLogger().addHandler(logging.NullHandler())
        raise StageFailed("train", boom, tmp_path / "run.log")

    monkeypatch.setattr(api, "run_engine", crashing_run)
    before = _caller_state()
    with pytest.raises(compress.StageFailure) as caught:
        compress.run_pipeline(yaml.safe_load(TINY_PIPELINE))
    assert _caller_state() == before
    error = caught.value
    assert isinstance(error, StageFailed) and error.exit_code == 3 and error.__cause__ is boom
    assert error.log_path == tmp_path / "run.log"
    assert str(error) == f"stage 'train' failed: ValueError: boom\n  full traceback: {tmp_path / 'run.log'}"


def test_import_compress_stays_cheap() -> None:
    code = "import sys, compress; compress.GateFailure; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
