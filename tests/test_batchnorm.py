"""BatchNorm adaptation: stale running statistics re-estimated on training images after training."""

from __future__ import annotations

import copy
import itertools
import json
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from compress import batchnorm
from compress.batchnorm import adapt_batchnorm
from compress.config import DataConfig, TrainingConfig
from compress.data import DataBundle, iterate_batches, load_data
from compress.layout import channels_last
from compress.measure import evaluate
from compress.models import build_model
from compress.training import FitSettings, fit
from tests.conftest import REPO, finish_cli, run_cli, start_cli, write_pipeline

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(data_root: Path) -> DataBundle:
    return load_data(DataConfig(val_size=500, limit_train=2000, limit_test=500), data_root)


def _slow_norm_net() -> nn.Module:
    """A small conv net whose BatchNorm layers average as slowly as MobileNetV3's (momentum 0.01)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.BatchNorm2d(16, momentum=0.01),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.BatchNorm2d(32, momentum=0.01),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _trained_briefly(bundle: DataBundle, tmp_path: Path) -> nn.Module:
    model = _slow_norm_net()
    cfg = TrainingConfig(
        epochs=1,
        batch_size=64,
        optimizer={"name": "adam", "lr": 0.01},
        schedule="constant",
        bn_adapt_batches=0,
    )
    result = fit(model, bundle, FitSettings(cfg, CPU, seed=0, workdir=tmp_path / "fit"))
    assert result.batchnorm is None  # bn_adapt_batches: 0 turns it off
    return model


def _expected_statistics(
    model: nn.Module, bundle: DataBundle, batches: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm layer's input statistics on the batches adaptation sees, averaged over them
    (what a cumulative average of per-batch mean and unbiased variance gives), computed by hand."""
    probe = copy.deepcopy(model).eval()
    norms = [m for m in probe.modules() if isinstance(m, nn.BatchNorm2d)]
    seen: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in norms}
    for norm in norms:
        norm.train()  # normalise with the batch's own statistics, as during adaptation
        norm.momentum = 0.0  # and leave the running ones alone
        norm.register_forward_pre_hook(
            lambda m, args: seen[m].append((args[0].mean((0, 2, 3)), args[0].var((0, 2, 3), unbiased=True)))
        )
    stream = iterate_batches(bundle, bundle.train, batch_size, CPU, shuffle=True, seed=seed)
    with torch.no_grad(), channels_last(probe):  # the layout (and conv kernels) adaptation uses
        for x, _ in itertools.islice(stream, batches):
            probe(x.contiguous(memory_format=torch.channels_last))
    return [
        (torch.stack([m for m, _ in seen[n]]).mean(0), torch.stack([v for _, v in seen[n]]).mean(0))
        for n in norms
    ]


def _off_by(norm: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> float:
    """How far a layer's running statistics are from ``mean``/``var``: the larger of the mean's
    error in standard deviations and the variance's relative error, over the channels."""
    mean_error = ((norm.running_mean - mean).abs() / var.sqrt()).max()
    return max(mean_error.item(), (norm.running_var / var - 1).abs().max().item())


def test_stale_statistics_are_replaced_by_the_exact_average_and_accuracy_rises(
    bundle: DataBundle, tmp_path: Path
) -> None:
    model = _trained_briefly(bundle, tmp_path)
    stale_accuracy = evaluate(model, bundle, bundle.test, CPU)["accuracy"]
    expected = _expected_statistics(model, bundle, batches=12, batch_size=100, seed=3)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm, (mean, var) in zip(norms, expected, strict=True):  # training left them far off
        assert _off_by(norm, mean, var) > 0.1

    record = adapt_batchnorm(model, bundle, CPU, batches=12, seed=3, desc="unit", batch_size=100)

    assert record is not None and record["kept"]
    assert (record["layers"], record["batches"], record["images"]) == (2, 12, 1200)
    for norm, (mean, var) in zip(norms, expected, strict=True):
        assert _off_by(norm, mean, var) < 5e-4  # float32 rounding of a 12-batch average (measured 7e-5)
        assert norm.momentum == 0.01  # restored after the cumulative average
    assert not model.training
    adapted_accuracy = evaluate(model, bundle, bundle.test, CPU)["accuracy"]
    assert adapted_accuracy > stale_accuracy + 0.15, (stale_accuracy, adapted_accuracy)
    assert record["val_accuracy_after"] > record["val_accuracy_before"] + 0.15, record


def test_adaptation_is_the_same_after_a_resume(bundle: DataBundle, tmp_path: Path) -> None:
    """fit re-estimates after its last epoch also when a resumed run had every epoch done: the
    statistics depend on the weights, the data and the seed alone."""
    cfg = TrainingConfig(epochs=1, batch_size=64, optimizer={"name": "adam", "lr": 0.01}, bn_adapt_batches=8)
    settings = FitSettings(cfg, CPU, seed=0, workdir=tmp_path / "fit")
    first = _slow_norm_net()
    done = fit(first, bundle, settings)
    again = _slow_norm_net()
    resumed = fit(again, bundle, settings)  # every epoch was done
    assert resumed.resumed_from_epoch == 1 and resumed.batchnorm is not None
    assert done.batchnorm["val_accuracy_after"] == resumed.batchnorm["val_accuracy_after"]
    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, again.state_dict()[key], rtol=0, atol=0, msg=key)


def test_a_model_without_batchnorm_is_left_alone_bit_for_bit(
    bundle: DataBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_evaluation(*args, **kwargs):
        raise AssertionError("a no-op must not evaluate")

    monkeypatch.setattr(batchnorm, "evaluate", no_evaluation)
    lenet = build_model({"arch": "lenet5", **bundle.model_fields()})
    calls: list[int] = []
    lenet.register_forward_hook(lambda *_: calls.append(1))
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    assert adapt_batchnorm(lenet, bundle, CPU, batches=50, seed=0) is None
    with_norms = _slow_norm_net()
    norms_before = {k: v.clone() for k, v in with_norms.state_dict().items()}
    assert adapt_batchnorm(with_norms, bundle, CPU, batches=0, seed=0) is None  # 0 turns it off
    assert not calls
    for model, saved in ((lenet, before), (with_norms, norms_before)):
        state = model.state_dict()
        assert state.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(state[key], value), key


def test_the_test_split_is_never_read(bundle: DataBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(self: DataBundle):
        raise AssertionError("batchnorm adaptation read the test split")

    read: list[int] = []
    original = batchnorm.iterate_batches

    def spy(data: DataBundle, split, *args, **kwargs):
        assert split is data.train, "adaptation must take training images"
        read.append(len(split))
        return original(data, split, *args, **kwargs)

    monkeypatch.setattr(DataBundle, "test", property(forbidden))
    monkeypatch.setattr(batchnorm, "iterate_batches", spy)
    reads = bundle.test_reads
    record = adapt_batchnorm(_slow_norm_net(), bundle, CPU, batches=4, seed=0, batch_size=64)
    assert record is not None and record["images"] == 256
    assert read == [len(bundle.train)] and bundle.test_reads == reads


RANKS_SCRIPT = """\
import json, os
import torch
import torch.distributed as dist
from compress import distributed
from compress.batchnorm import adapt_batchnorm, batchnorm_layers
from compress.config import DataConfig
from compress.data import load_data
from compress.models import build_model

with distributed.session():
    bundle = load_data(DataConfig(val_size=300, limit_train=1024, limit_test=300), os.environ["DATA"])
    out = {}
    for keep in (True, False):  # a claimed 0 % before: kept; 100 %: the trained statistics stay
        torch.manual_seed(0)
        model = build_model({"arch": "resnet20", "width": 0.5, **bundle.model_fields()})
        for norm in batchnorm_layers(model):  # as DDP's last step leaves them: each rank its own
            norm.running_mean.fill_(distributed.rank() + 3.0)
        before = 0.0 if keep else 1.0
        record = adapt_batchnorm(model, bundle, torch.device("cpu"), 6, 0, "ranks", val_before=before)
        norms = batchnorm_layers(model)
        flat = torch.cat([t.flatten() for m in norms for t in (m.running_mean, m.running_var)])
        every = [torch.zeros_like(flat) for _ in range(distributed.world_size())]
        dist.all_gather(every, flat)
        out[str(keep)] = {"kept": record["kept"], "same": all(torch.equal(every[0], t) for t in every)}
    if distributed.is_main():
        print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
def test_every_rank_ends_with_the_same_statistics(tmp_path: Path, data_root: Path) -> None:
    """Under torchrun every rank adapts on the same batches and takes rank 0's statistics, also
    when the trained ones (which DDP's last step leaves different on each rank) are kept."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT, encoding="utf-8")
    result = run_cli(
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", _free_port(), script,
        cwd=tmp_path, module="torch.distributed.run", timeout=180,
        env={"OMP_NUM_THREADS": "1", "DATA": str(data_root), "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    assert json.loads(line[len("RESULT ") :]) == {
        "True": {"kept": True, "same": True},
        "False": {"kept": False, "same": True},
    }


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def test_a_negative_setting_is_a_one_line_error_naming_the_key(tmp_path: Path) -> None:
    pipeline = write_pipeline(
        tmp_path,
        """\
data: {dataset: mnist}
stages:
  - stage: train
    model: {arch: resnet20}
    bn_adapt_batches: -1
""",
    )
    result = run_cli(pipeline, "--validate", cwd=tmp_path, data_root=tmp_path / "no-data")
    assert result.returncode == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bn_adapt_batches" in lines[0], result.output


MOBILENET = """\
seed: 0
device: cpu
data: {{dataset: mnist, image_size: 32, channels: 3, val_size: 500, limit_train: 1500, limit_test: 1000}}
stages:
  - stage: train
    model: {{torchvision: mobilenet_v3_small}}
    epochs: 1
    batch_size: 32
    optimizer: {{name: adamw, lr: 0.002, weight_decay: 0.0001}}
    bn_adapt_batches: {batches}
"""


@pytest.mark.slow
def test_mobilenet_v3_small_scores_far_above_chance_after_a_short_run(
    tmp_path: Path, data_root: Path
) -> None:
    """MobileNetV3's BatchNorm momentum is 0.01: after 47 steps its running statistics are still
    mostly their initial values, so without adaptation it scores chance in eval mode (measured:
    8.9 % test, 9.8 % validation; with adaptation 71.5 % test, validation 9.8 % -> 74.0 %)."""
    started = {}
    for batches in (50, 0):
        cwd = tmp_path / f"bn{batches}"
        cwd.mkdir()
        pipeline = write_pipeline(cwd, MOBILENET.format(batches=batches), name="mobile")
        started[batches] = (start_cli(pipeline, "-q", cwd=cwd, data_root=data_root), cwd)
    runs = {}
    for batches, (proc, cwd) in started.items():
        result = finish_cli(proc, cwd, timeout=300)
        assert result.returncode == 0, result.output
        run_dir = cwd / "artifacts" / "mobile" / "latest"
        metrics = json.loads((run_dir / "stages" / "train" / "result.json").read_text())["metrics"]
        runs[batches] = (metrics, (run_dir / "run.log").read_text())

    adapted, log = runs[50]
    record = adapted["batchnorm"]
    assert (record["layers"], record["batches"], record["images"], record["kept"]) == (34, 47, 1500, True)
    assert record["val_accuracy_before"] < 0.2 and record["val_accuracy_after"] > 0.6, record
    assert adapted["val_accuracy"] == record["val_accuracy_after"]
    assert "train: batchnorm re-estimated in 34 layers over 47 batches (1,500 training images): " in log
    assert "validation accuracy " in log and " % -> " in log
    stale, stale_log = runs[0]
    assert stale["batchnorm"] is None and "batchnorm re-estimated" not in stale_log
    assert stale["test_accuracy"] < 0.2 < 0.6 < adapted["test_accuracy"], (stale, adapted)
