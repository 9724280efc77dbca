"""Working ahead: while the engine runs one stage, a second process runs the later stages whose
inputs exist, through the same cache, and the run reads as if it had gone in file order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from compress.config import load_pipeline
from compress.engine.ahead import Ahead, enabled
from compress.engine.records import RunOptions
from compress.stages import config_registry, load_stages
from tests.conftest import run_cli, write_pipeline

PIPELINE = """\
seed: 0
device: cpu
data: {dataset: mnist, val_size: 500, limit_train: 2000, limit_test: 500}
stages:
  - stage: train
    model: {arch: lenet5, width: 0.5}
    epochs: 1
    batch_size: 64
    optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  - stage: prune
    amount: 0.8
    finetune: {epochs: 1, batch_size: 64}
  - stage: distill
    student: {arch: lenet5, width: 0.25}
    epochs: 2
    batch_size: 64
    control: false
  - stage: quantize
    from: [baseline, pruned]
    modes: [dynamic]
    tolerance: null
  - stage: benchmark
    batch_sizes: [1]
    repeats: 5
    min_seconds: 0
"""


def test_the_plan_is_the_later_stages_whose_inputs_exist(tmp_path: Path) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path, PIPELINE), config_registry())
    stages = pipeline.stages
    ahead = Ahead(stages, load_stages(), tmp_path, tmp_path, on=True)
    # before prune runs, only the baseline exists: distill reads it, quantize also needs
    # pruned, and the benchmark reads the run's results (it never goes ahead)
    assert [s.label for s in ahead._plan(1, ["baseline"])] == ["distill"]
    assert [s.label for s in ahead._plan(2, ["baseline", "pruned"])] == ["quantize"]
    assert ahead._plan(3, ["baseline", "pruned", "student"]) == []
    on = RunOptions()
    assert enabled(on, torch.device("cpu")) is ((__import__("os").cpu_count() or 1) >= 2)
    assert not enabled(RunOptions(only_stage="prune"), torch.device("cpu"))
    assert not enabled(RunOptions(force=True), torch.device("cpu"))
    assert not enabled(on, torch.device("cuda"))


@pytest.mark.slow
def test_a_run_works_ahead_and_reads_as_if_it_went_in_file_order(tmp_path: Path, data_root: Path) -> None:
    if not enabled(RunOptions(), torch.device("cpu")):
        pytest.skip("working ahead needs two cores")  # pragma: no cover - CI has two
    pipeline = write_pipeline(tmp_path, PIPELINE)
    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 0, result.output
    assert "working ahead in a second process: distill" in result.stderr
    assert re.search(r"stage distill: ran in [\d.]+s \(ahead, in a second process\)", result.stderr), (
        result.stderr
    )
    run_dir = (tmp_path / "artifacts" / "tiny" / "latest").resolve()
    log = (run_dir / "run.log").read_text()
    # the two processes overlapped: distill started before prune finished
    assert log.index("stage distill: running") < log.index("stage prune: ran in"), log
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["train", "prune", "distill", "quantize", "benchmark"]
    assert all(s["status"] == "ran" for s in manifest["stages"])
    assert list(manifest["variants"]) == [
        "baseline",
        "pruned",
        "student",
        "baseline.int8-dynamic",
        "pruned.int8-dynamic",
    ]
    assert (run_dir / "ahead" / "distill.json").is_file()
    student = manifest["variants"]["student"]["metrics"]
    assert 0.5 < student["test_accuracy"] <= 1.0, student
    # the next run reuses everything, whichever process made it
    again = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert again.returncode == 0, again.output
    assert "(0 ran, 5 cached)" in again.stdout, again.stdout
    assert "working ahead" not in again.stderr  # nothing left to run ahead


def test_jobs_1_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_JOBS", "1")
    assert not enabled(RunOptions(), torch.device("cpu"))


def test_an_entry_made_in_this_run_by_the_other_process_counts_as_run(tmp_path: Path) -> None:
    """The cache entry itself says which run made it, so the parent tells "the child ran it"
    from "an earlier run left it" even when it reads the entry the instant the child commits
    (a separate marker written after the commit once lost that race in CI)."""
    from types import SimpleNamespace

    from compress.engine import cache
    from compress.engine.records import StageRecord
    from compress.engine.runner import _Run
    from compress.variants import StageResult

    partial, entry = tmp_path / "partial", tmp_path / "distill-abc"
    partial.mkdir()
    (partial / "metrics.json").write_text("{}")
    this_run = tmp_path / "runs" / "20261207-120000"
    cache.commit(partial, entry, StageResult(metrics={"x": 1}), {"run": str(this_run), "seconds": 1.5})
    loaded = cache.load_cached(entry, "distill")
    assert loaded is not None and loaded.made == {"run": str(this_run), "seconds": 1.5}

    def claimed(run_dir: Path) -> StageRecord:
        record = StageRecord("distill", "distill", "cached", 0.01, "abc", entry, [], [], loaded)
        return _Run._claim(SimpleNamespace(ctx=SimpleNamespace(run_dir=run_dir)), record)  # type: ignore[arg-type]

    mine = claimed(this_run)
    assert (mine.status, mine.seconds, mine.ahead) == ("ran", 1.5, True)
    earlier = claimed(tmp_path / "runs" / "20261208-090000")
    assert (earlier.status, earlier.seconds, earlier.ahead) == ("cached", 0.01, False)
