"""Training: checkpoint/resume gives the same model as an uninterrupted run; kills resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress.config import DataConfig, TrainingConfig
from compress.data import load_data
from compress.models import build_model
from compress.training import FitSettings, fit
from tests.conftest import TINY_PIPELINE, run_cli, write_pipeline


class _Stop(Exception):
    pass


def _stop_after_first_epoch(epoch: int, row: dict) -> None:
    if epoch == 1:
        raise _Stop


def test_resumed_training_matches_uninterrupted(tmp_path: Path, data_root: Path) -> None:
    bundle = load_data(DataConfig(val_size=200, limit_train=512, limit_test=200), data_root)
    spec = {"arch": "lenet300", "width": 0.25, **bundle.model_fields()}
    cfg = TrainingConfig(epochs=2, batch_size=64, optimizer={"lr": 0.05})
    device = torch.device("cpu")

    torch.manual_seed(0)
    straight = build_model(spec)
    fit(straight, bundle, FitSettings(cfg, device, seed=1, workdir=tmp_path / "straight"))

    torch.manual_seed(0)
    interrupted = build_model(spec)
    with pytest.raises(_Stop):
        stopped = FitSettings(
            cfg, device, seed=1, workdir=tmp_path / "resumed", on_epoch=_stop_after_first_epoch
        )
        fit(interrupted, bundle, stopped)
    torch.manual_seed(123)  # a fresh process would start from a different random state
    resumed = build_model(spec)
    result = fit(resumed, bundle, FitSettings(cfg, device, seed=1, workdir=tmp_path / "resumed"))

    assert result.resumed_from_epoch == 1
    assert [row["epoch"] for row in result.history] == [1, 2]
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key


@pytest.mark.slow
def test_killed_run_resumes_training_at_the_next_epoch(tmp_path: Path, data_root: Path) -> None:
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE.replace("epochs: 1", "epochs: 3"))
    env = {**os.environ, "COMPRESS_DATA_ROOT": str(data_root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "compress.run", str(pipeline)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = tmp_path / "artifacts" / "tiny" / "cache" / ".partial"
    deadline = time.monotonic() + 240
    while not list(partial.glob("*/work/checkpoint.pt")):
        assert proc.poll() is None, "the run ended before writing its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 0, result.output
    manifest = json.loads((tmp_path / "artifacts/tiny/latest/manifest.json").read_text())
    metrics = manifest["stages"][0]["metrics"]
    assert metrics["resumed_from_epoch"] >= 1
    assert metrics["epochs"] == 3
    history = json.loads((tmp_path / "artifacts/tiny/latest/stages/train/work/history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert not list(partial.iterdir()), "the finished stage must leave no partial directory"


def test_conv_nets_train_channels_last_and_come_back_in_the_standard_layout(
    tmp_path: Path, data_root: Path
) -> None:
    """oneDNN's conv kernels are fastest in channels-last memory, so ``fit`` trains (and
    ``evaluate`` scores) conv nets in it; saving, pruning and export see the standard layout
    again afterwards, also when training stops with an exception."""
    from compress.measure import evaluate

    bundle = load_data(DataConfig(val_size=200, limit_train=256, limit_test=200), data_root)
    spec = {"arch": "lenet5", "width": 0.5, **bundle.model_fields()}
    cfg = TrainingConfig(epochs=2, batch_size=64, optimizer={"lr": 0.05})
    device = torch.device("cpu")
    model = build_model(spec)
    conv = model.features[3]  # 10 -> 25 channels: its two layouts differ
    seen: list[bool] = []
    conv.register_forward_pre_hook(lambda _, args: seen.append(conv.weight.is_contiguous()))

    with pytest.raises(_Stop):
        fit(model, bundle, FitSettings(cfg, device, 0, tmp_path / "a", on_epoch=_stop_after_first_epoch))
    assert seen and not any(seen)  # every forward pass, training and validation, in channels-last
    assert conv.weight.is_contiguous()  # back in the standard layout although fit raised

    seen.clear()
    fit(model, bundle, FitSettings(cfg, device, seed=0, workdir=tmp_path / "a"))
    evaluate(model, bundle, bundle.test, device)
    assert seen and not any(seen)
    assert all(p.is_contiguous() for p in model.parameters())
