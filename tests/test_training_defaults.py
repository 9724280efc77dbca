"""Training settings a run derives when the YAML leaves them open: the batch size that gives a
short run enough steps, and ``optimizer.lr: auto`` (a learning-rate range test on training data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from compress import lr_find, optimizer_choice
from compress.config import TrainingConfig
from compress.config.data import DataConfig
from compress.data import load_data
from compress.models import build_model
from compress.training import FitSettings, make_optimizer
from compress.training_defaults import FALLBACK_LR, MIN_STEPS, baseline_batch_size, resolve
from tests.conftest import run_cli, write_pipeline


@pytest.mark.parametrize(
    ("images", "epochs", "expected"),
    [
        (2_000, 1, 16),  # 125 steps at 16; 63 at 32 is too few
        (2_500, 2, 32),  # 158 steps at 32
        (6_000, 1, 32),  # 47 steps at 128 and 94 at 64 are too few; 188 at 32
        (55_000, 1, 128),  # a full data set keeps 128
        (100, 1, 16),  # never below 16, however few the images
    ],
)
def test_the_baseline_batch_gives_a_short_run_enough_steps(images: int, epochs: int, expected: int) -> None:
    chosen = baseline_batch_size(TrainingConfig(epochs=epochs), images).batch_size
    steps = epochs * -(-images // chosen)
    assert chosen == expected
    assert steps >= MIN_STEPS or chosen == 16
    if chosen < 128:  # the next size up would have had too few steps
        assert epochs * -(-images // (2 * chosen)) < MIN_STEPS


def test_a_hand_set_batch_size_wins() -> None:
    assert baseline_batch_size(TrainingConfig(epochs=1, batch_size=256), 2_000).batch_size == 256


@pytest.fixture(scope="module")
def small_mnist(data_root: Path):
    return load_data(DataConfig(dataset="mnist", limit_train=1_000, limit_test=200, val_size=200), data_root)


def test_range_test_picks_a_rate_from_real_losses_and_leaves_the_model_alone(small_mnist) -> None:
    torch.manual_seed(0)
    model = build_model({"arch": "lenet5", "in_channels": 1, "image_size": 28, "num_classes": 10})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainingConfig(optimizer={"name": "sgd", "lr": lr_find.MIN_LR})

    def run(seed: int) -> lr_find.RangeTest:
        return lr_find.range_test(
            model, small_mnist, lambda m: make_optimizer(m, cfg), 32, "none", torch.device("cpu"), seed
        )

    found = run(0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy trained
    assert found.rates == sorted(found.rates) and found.rates[0] == pytest.approx(lr_find.MIN_LR)
    # LeNet-5 learns: the smoothed loss falls well below ln 10 before the rate gets too high
    assert min(found.losses) < 0.85 * found.losses[0]
    assert found.lr_at_minimum == found.rates[found.losses.index(min(found.losses))]
    assert found.lr == pytest.approx(found.lr_at_minimum * lr_find.SHARE_OF_MINIMUM)
    assert 1e-4 < found.lr < 1.0
    assert run(0).lr == found.lr  # the same seed, the same rate


class _CannotLearn(nn.Module):
    """Logits that no parameter moves: the loss stays at ln 10 whatever the rate."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 10) + 0 * self.unused


def test_a_range_test_that_finds_no_dip_falls_back_to_the_usual_rate(small_mnist, tmp_path: Path) -> None:
    cfg = TrainingConfig(epochs=1, optimizer={"name": "adamw", "lr": "auto"})
    settings = FitSettings(cfg, torch.device("cpu"), seed=0, workdir=tmp_path)
    resolved, record = resolve(settings, _CannotLearn(), small_mnist, make_optimizer)
    assert record["lr_auto"]["lr"] is None  # nothing found, and the record says so
    assert resolved.optimizer.lr == record["lr_auto"]["used"] == FALLBACK_LR["adamw"]
    assert json.loads((tmp_path / "lr_find.json").read_text())["lr"] is None


PIPELINE = """\
seed: 0
device: cpu
data: {{dataset: mnist, val_size: 300, limit_train: 1000, limit_test: 500}}
stages:
  - stage: train
    model: {{arch: lenet5, width: 0.5}}
    epochs: 1
    optimizer: {optimizer}
    schedule: {schedule}
"""


def _pipeline(cwd: Path, optimizer: str, schedule: str = "onecycle") -> Path:
    return write_pipeline(cwd, PIPELINE.format(optimizer=optimizer, schedule=schedule))


def test_lr_auto_trains_with_the_rate_the_range_test_chose(tmp_path: Path, data_root: Path) -> None:
    pipeline = _pipeline(tmp_path, "{name: sgd, lr: auto}")
    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 0, result.output
    stage = tmp_path / "artifacts" / "tiny" / "latest" / "stages" / "train"
    metrics = json.loads((stage / "result.json").read_text())["metrics"]
    derived = metrics["training_settings"]
    assert derived["batch_size"] == 16 and derived["batch_size_auto"]  # 1,000 images, 1 epoch
    chosen = derived["lr_auto"]["lr"]
    assert derived["lr_auto"]["used"] == chosen  # the test found a dip: no fallback
    assert 1e-4 < chosen < 1.0
    saved = json.loads((stage / "work" / "lr_find.json").read_text())  # what a resumed fit reuses
    assert saved["lr"] == chosen
    history = json.loads((stage / "work" / "history.json").read_text())
    assert history[-1]["lr"] <= chosen  # onecycle anneals from the chosen peak
    assert metrics["test_accuracy"] > 0.7  # LeNet-5 learns at the chosen rate (79 % measured; chance 10 %)
    log = (stage.parent.parent / "run.log").read_text()
    assert "lr auto: range test over" in log and f"{chosen:.2e}" in log


@pytest.mark.parametrize(
    ("optimizer", "schedule", "key", "words"),
    [
        ("{name: sgd, lr: auto}", "constant", "stages[0] (train).schedule", "cannot take optimizer.lr: auto"),
        ("{name: sgd, lr: -0.1}", "onecycle", "stages[0] (train).optimizer.lr", "> 0 and <= 10, or auto"),
        ("{name: sgd, lr: fast}", "onecycle", "stages[0] (train).optimizer.lr", "a number such as 0.05"),
    ],
)
def test_a_bad_lr_is_one_line_naming_the_key(
    tmp_path: Path, data_root: Path, optimizer: str, schedule: str, key: str, words: str
) -> None:
    pipeline = _pipeline(tmp_path, optimizer, schedule)
    result = run_cli(pipeline, "--validate", cwd=tmp_path, data_root=data_root)
    assert result.returncode == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(pipeline.name) in lines[0] and key in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("yaml_keys", "images", "epochs", "val", "probes"),
    [
        ({}, 2_000, 1, 200, True),  # 16 steps at 128: short
        ({}, 2_500, 2, 250, True),  # 40 steps at 128
        ({}, 55_000, 1, 5_000, False),  # full-size data keeps the measured SGD 0.05
        ({"optimizer": {"name": "sgd"}}, 2_000, 1, 200, False),  # any optimizer key is the user's
        ({}, 2_000, 1, 0, False),  # nothing to score the candidates on
    ],
)
def test_the_optimizer_is_probed_only_when_left_out_on_a_short_run(
    yaml_keys: dict, images: int, epochs: int, val: int, probes: bool
) -> None:
    cfg = baseline_batch_size(TrainingConfig(epochs=epochs, **yaml_keys), images)
    assert optimizer_choice.needs_probe(cfg, images, val) is probes


def test_a_short_run_trains_with_the_probed_optimizer(tmp_path: Path, data_root: Path) -> None:
    pipeline = write_pipeline(
        tmp_path, PIPELINE.replace("    optimizer: {optimizer}\n", "").format(schedule="onecycle")
    )
    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 0, result.output
    stage = tmp_path / "artifacts" / "tiny" / "latest" / "stages" / "train"
    probe = json.loads((stage / "result.json").read_text())["metrics"]["training_settings"]["optimizer_probe"]
    tried = probe["candidates"]
    assert [(t["name"], t["lr"]) for t in tried] == [(n, lr) for n, lr, _ in optimizer_choice.CANDIDATES]
    assert probe["images"] == 333  # a third of the 1,000 training images
    assert all(0 <= t["val_accuracy"] <= 1 for t in tried)
    assert probe["chosen"] == optimizer_choice._best(tried, 10)
    history = json.loads((stage / "work" / "history.json").read_text())
    assert max(h["lr"] for h in history) <= probe["chosen"]["lr"]  # the real fit used the chosen rate
    assert json.loads((stage / "work" / "optimizer_probe.json").read_text()) == probe  # kept for a resume
    log = (stage.parent.parent / "run.log").read_text()
    assert f"training with {probe['chosen']['name']} {probe['chosen']['lr']:g}" in log
    # a hand-set optimizer is used as it is: no probe
    hand_set = tmp_path / "hand-set"
    hand_set.mkdir()
    result = run_cli(_pipeline(hand_set, "{name: sgd, lr: 0.05}"), cwd=hand_set, data_root=data_root)
    assert result.returncode == 0, result.output
    metrics = json.loads((hand_set / "artifacts/tiny/latest/stages/train/result.json").read_text())["metrics"]
    assert "optimizer_probe" not in metrics["training_settings"]


def test_the_probe_picks_by_accuracy_and_by_loss_only_while_all_are_at_chance() -> None:
    def row(name: str, accuracy: float, loss: float) -> dict:
        return {"name": name, "val_accuracy": accuracy, "val_loss": loss}

    learning = [row("sgd", 0.60, 1.0), row("adamw", 0.60, 0.5), row("slow", 0.20, 0.1)]
    assert optimizer_choice._best(learning, 10)["name"] == "sgd"  # a tie goes to the earlier one
    stuck = [row("sgd", 0.13, 2.30), row("adamw", 0.11, 2.10), row("slow", 0.14, 2.29)]
    assert optimizer_choice._best(stuck, 10)["name"] == "adamw"  # all within 5 pp of 10 %: the loss
    assert optimizer_choice._best(stuck, 2)["name"] == "adamw"  # 14 % is below chance at 2 classes


def test_a_probed_choice_that_ends_at_chance_trains_again_with_the_runner_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VGG-11's case: the probe's leader after a third of the data ends the epoch at chance; the
    model starts again from its initial weights under the runner-up, in a work directory of its
    own. A choice that learns is kept (one fit)."""
    from types import SimpleNamespace

    from compress.training import FitResult

    candidates = [
        {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4, "val_accuracy": 0.185, "val_loss": 2.30},
        {"name": "sgd", "lr": 0.01, "weight_decay": 5e-4, "val_accuracy": 0.12, "val_loss": 2.31},
        {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "val_accuracy": 0.08, "val_loss": 2.31},
    ]
    probe = {"images": 600, "candidates": candidates, "chosen": candidates[0]}
    fits: list[tuple[str, float, Path, torch.Tensor]] = []
    ends = {0.05: 0.12, 0.01: 0.67}  # val accuracy each rate ends the epoch at

    def fake_fit(model: nn.Module, bundle: object, settings: FitSettings) -> FitResult:
        opt = settings.cfg.optimizer
        fits.append((opt.name, opt.lr, settings.workdir, model.weight.detach().clone()))
        with torch.no_grad():
            model.weight.add_(1.0)  # training moves the weights
        return FitResult(history=[{"val_accuracy": ends[opt.lr], "train_loss": 1.0}])

    def fake_choose(model: nn.Module, bundle: object, settings: FitSettings):
        return optimizer_choice._with_optimizer(settings.cfg, "sgd", 0.05, 5e-4), probe

    monkeypatch.setattr(optimizer_choice, "fit", fake_fit)
    monkeypatch.setattr(optimizer_choice, "choose_optimizer", fake_choose)
    model = nn.Linear(2, 10)
    initial = model.weight.detach().clone()
    bundle = SimpleNamespace(num_classes=10)
    settings = FitSettings(TrainingConfig(epochs=1), torch.device("cpu"), 0, tmp_path / "work", desc="train")
    result, record = optimizer_choice.fit_with_choice(model, bundle, settings)  # type: ignore[arg-type]
    assert [(name, lr, work.relative_to(tmp_path).as_posix()) for name, lr, work, _ in fits] == [
        ("sgd", 0.05, "work"),
        ("sgd", 0.01, "work/runner-up"),
    ]
    assert torch.equal(fits[1][3], initial)  # the second fit started from the initial weights
    assert result.val_accuracy == 0.67
    assert record is not None and record["chosen"]["lr"] == 0.01
    assert record["at_chance"]["lr"] == 0.05 and record["at_chance"]["val_accuracy_after_fit"] == 0.12
    # a choice that learns is kept
    fits.clear()
    ends[0.05] = 0.55
    result, record = optimizer_choice.fit_with_choice(nn.Linear(2, 10), bundle, settings)  # type: ignore[arg-type]
    assert [lr for _, lr, _, _ in fits] == [0.05] and record is probe
