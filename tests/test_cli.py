"""The CLI end to end on real MNIST subsets: run directory, manifest, caching, re-runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from compress.fileio import sha256_file
from tests.conftest import TINY_PIPELINE, TinyRun, run_cli, write_pipeline

TWO_STAGES = (
    TINY_PIPELINE
    + """\
  - stage: train
    name: small
    model: {arch: lenet300, width: 0.25}
    epochs: 1
    output: small
"""
)


def _manifest(cwd: Path, pipeline: str = "tiny") -> dict:
    return json.loads((cwd / "artifacts" / pipeline / "latest" / "manifest.json").read_text())


def _statuses(manifest: dict) -> dict[str, str]:
    return {stage["name"]: stage["status"] for stage in manifest["stages"]}


def test_tiny_run_writes_run_directory_manifest_and_metrics(tiny_run: TinyRun) -> None:
    run_dir = tiny_run.run_dir
    for name in ("manifest.json", "config.yaml", "run.log"):
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["pipeline"] == "tiny"
    assert manifest["device"] == "cpu"
    assert manifest["versions"]["torch"].startswith("2.14")
    assert manifest["threads"] >= 1 and manifest["cpu_model"]
    (stage,) = manifest["stages"]
    assert stage["status"] == "ran"
    output = stage["outputs"]["baseline"]
    assert output["sha256"] == sha256_file(tiny_run.baseline)
    metrics = stage["metrics"]
    # 2,000 images and one epoch: far better than chance, far from converged.
    assert 0.5 < metrics["test_accuracy"] < 0.99
    assert metrics["test_count"] == 1000
    assert metrics["parameters"] > 10_000
    result = json.loads((run_dir / "stages" / "train" / "result.json").read_text())
    per_class = result["metrics"]["per_class_accuracy"]
    assert len(per_class) == 10
    assert len(result["metrics"]["history"]) == 1
    assert "baseline" in (run_dir / "run.log").read_text()


def test_second_run_hits_cache_and_force_reruns(tiny_run: TinyRun, tmp_path: Path, data_root: Path) -> None:
    # the first run is the session's tiny run of the same pipeline: its artifacts, copied here
    shutil.copytree(tiny_run.cwd / "artifacts", tmp_path / "artifacts", symlinks=True)
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE)
    first_manifest = _manifest(tmp_path)
    assert _statuses(first_manifest) == {"train": "ran"}

    second = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert second.returncode == 0, second.output
    assert "1 cached" in second.stdout
    manifest = _manifest(tmp_path)
    assert manifest["run_id"] != first_manifest["run_id"]
    assert _statuses(manifest) == {"train": "cached"}
    assert manifest["stages"][0]["metrics"] == first_manifest["stages"][0]["metrics"]

    forced = run_cli(pipeline, "--force", cwd=tmp_path, data_root=data_root)
    assert forced.returncode == 0, forced.output
    assert _statuses(_manifest(tmp_path)) == {"train": "ran"}


@pytest.mark.slow
def test_editing_one_stage_reruns_only_it(tmp_path: Path, data_root: Path) -> None:
    pipeline = write_pipeline(tmp_path, TWO_STAGES)
    assert run_cli(pipeline, cwd=tmp_path, data_root=data_root).returncode == 0
    assert _statuses(_manifest(tmp_path)) == {"train": "ran", "small": "ran"}

    edited = run_cli(pipeline, "--set", "small.model.width=0.5", cwd=tmp_path, data_root=data_root)
    assert edited.returncode == 0, edited.output
    assert _statuses(_manifest(tmp_path)) == {"train": "cached", "small": "ran"}

    again = run_cli(pipeline, "--from", "small", cwd=tmp_path, data_root=data_root)
    assert again.returncode == 0, again.output
    assert _statuses(_manifest(tmp_path)) == {"train": "cached", "small": "ran"}

    only = run_cli(pipeline, "--only", "train", cwd=tmp_path, data_root=data_root)
    assert only.returncode == 0, only.output
    assert _statuses(_manifest(tmp_path)) == {"train": "ran"}


def test_only_without_cached_inputs_is_a_clear_error(tmp_path: Path, data_root: Path) -> None:
    pipeline = write_pipeline(tmp_path, TWO_STAGES)
    result = run_cli(pipeline, "--only", "small", cwd=tmp_path, data_root=data_root)
    assert result.returncode == 2
    assert "run the pipeline once without --only" in result.stderr
    assert "Traceback" not in result.output


def test_validate_touches_neither_data_nor_artifacts(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE)
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    result = run_cli(pipeline, "--validate", cwd=tmp_path, data_root=empty)
    assert result.returncode == 0, result.output
    assert "is valid" in result.stdout
    assert not (tmp_path / "artifacts").exists()


def test_help_lists_every_option(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--set", "--from", "--only", "--force", "--device", "--data-root", "--validate"):
        assert option in result.stdout


def test_cuda_without_gpu_is_a_clear_error(tmp_path: Path, data_root: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is about machines without it")
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE)
    result = run_cli(pipeline, "--device", "cuda", cwd=tmp_path, data_root=data_root)
    assert result.returncode == 2
    assert "no CUDA device is available" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_data_root_without_the_data_fails_even_when_every_stage_is_cached(
    tiny_run: TinyRun, tmp_path: Path, data_root: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    result = run_cli(tiny_run.pipeline, "--data-root", empty, cwd=tiny_run.cwd, env=env)
    assert result.returncode == 2, result.output
    assert "dataset 'mnist' not found" in result.stderr and str(empty / "MNIST" / "raw") in result.stderr
    again = run_cli(tiny_run.pipeline, cwd=tiny_run.cwd, data_root=data_root)  # the real root: all cached
    assert again.returncode == 0 and "(0 ran, 1 cached)" in again.stdout, again.output
