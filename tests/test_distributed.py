"""Multi-process training: two CPU processes with gloo under torchrun, and the shard maths.

The launch test runs the tiny MNIST pipeline (plus a report stage, which runs on rank 0
alone) with ``python -m torch.distributed.run --nproc_per_node 2`` and compares it with the
single-process ``tiny_run`` of the same pipeline, seed and budget.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from compress import distributed
from compress.config import TrainingConfig
from compress.errors import ConfigError
from compress.training import resolve_precision
from tests.conftest import TINY_PIPELINE, TinyRun, run_cli, write_pipeline

WITH_REPORT = TINY_PIPELINE + "  - stage: report\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.mark.parametrize("n, world", [(2000, 2), (1001, 2), (10, 3), (7, 4), (5, 1)])
def test_epoch_shards_partition_the_shuffled_epoch(n: int, world: int) -> None:
    shards = [distributed.epoch_shard(n, seed=123, epoch=4, rank_=r, world=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "every rank must take the same number of steps"
    assert len(shards[0]) == -(-n // world)
    flat = torch.cat(shards)
    assert sorted(set(flat.tolist())) == list(range(n)), "the shards must cover the epoch"
    assert len(flat) - n < world, "at most world-1 images are repeated (DistributedSampler's padding)"
    if n % world == 0:
        assert len(set(flat.tolist())) == len(flat), "the shards must be disjoint"
    # dealt round-robin from the single-process shuffle, so global step k sees the same images
    order = torch.randperm(n, generator=torch.Generator().manual_seed(123 + 4))
    padded = torch.cat([order, order[: len(flat) - n]])
    for r, shard in enumerate(shards):
        assert torch.equal(shard, padded[r::world])
    # a new epoch is a new shuffle
    assert not torch.equal(distributed.epoch_shard(n, 123, 5, 0, world), shards[0]) or n < 3


def test_eval_shards_count_every_image_exactly_once() -> None:
    for n, world in ((1000, 2), (1001, 3), (2, 4)):
        flat = torch.cat([distributed.eval_shard(n, r, world) for r in range(world)])
        assert sorted(flat.tolist()) == list(range(n))


def test_single_process_helpers_and_precision_checks() -> None:
    assert not distributed.initialized() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.on_main(lambda: 7) == 7
    cpu = torch.device("cpu")
    assert resolve_precision(TrainingConfig(), cpu) == "fp32"
    assert resolve_precision(TrainingConfig(precision="fp32"), cpu) == "fp32"
    with pytest.raises(ConfigError, match="bf16 needs a CUDA device"):
        resolve_precision(TrainingConfig(precision="bf16"), cpu)
    with pytest.raises(ValueError, match="amp is false"):
        TrainingConfig(amp=False, precision="fp16")


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path: Path, data_root: Path, tiny_run: TinyRun) -> None:
    pipeline = write_pipeline(tmp_path, WITH_REPORT)
    result = run_cli(
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", _free_port(),
        "-m", "compress.run", pipeline,
        cwd=tmp_path, data_root=data_root, module="torch.distributed.run", timeout=120,
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.output
    assert result.stdout.count("done: 2 stages (2 ran, 0 cached)") == 1, "rank 0 alone prints the summary"

    base = tmp_path / "artifacts" / "tiny"
    runs = [p for p in base.iterdir() if p.name not in ("cache", "latest")]
    assert len(runs) == 1, f"one run directory, got {runs}"
    run_dir = runs[0]
    assert (base / "latest").resolve() == run_dir.resolve()
    cache = sorted(p.name.split("-")[0] for p in (base / "cache").iterdir() if not p.name.startswith("."))
    assert cache == ["report", "train"], "one cache entry per stage"
    assert list((base / "cache" / ".partial").iterdir()) == [], "no work or per-rank scratch left over"
    html = sorted(p.name for p in (tmp_path / "reports" / "tiny").glob("*.html"))
    assert len(html) == 2 and "latest.html" in html, f"one report (+ latest.html), got {html}"

    manifest = _manifest(run_dir)
    assert manifest["world_size"] == 2
    assert manifest["distributed"]["backend"] == "gloo"
    assert [s["name"] for s in manifest["stages"]] == ["train", "report"]
    assert manifest["stages"][0]["training"] == {"precision": "fp32", "world_size": 2}
    assert "training" not in manifest["stages"][1]
    log = (run_dir / "run.log").read_text()
    assert "DistributedDataParallel on 2 processes, 16 images per process per step" in log

    single = _manifest(tiny_run.run_dir)
    assert single["world_size"] == 1 and single["distributed"] is None
    one = single["variants"]["baseline"]["metrics"]
    two = manifest["variants"]["baseline"]["metrics"]
    assert two["test_count"] == one["test_count"] == 1000, "the whole test split, counted once"
    assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 0.01, (one, two)
    # the global batch is kept (2 x 16 images, the same 32 as one process): the curves agree
    history = json.loads((run_dir / "stages" / "train" / "work" / "history.json").read_text())
    reference = json.loads((tiny_run.run_dir / "stages" / "train" / "work" / "history.json").read_text())
    assert history[-1]["train_loss"] == pytest.approx(reference[-1]["train_loss"], rel=0.02)
