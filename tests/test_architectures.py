"""Every kind of architecture a user brings is channel-pruned ("slim"), saved, and rebuilt from
its file with the same outputs, or refused before any work in one line naming the model, the
stage and the reason. Structural only (untrained models, no data): seconds per model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compress import pruning
from compress.config.safety import import_factory
from compress.models import build_model, inspect, load_model, save_model
from compress.pruning.probe import slim_problem
from tests.conftest import write_pipeline

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TORCHVISION = {
    "mobilenet_v3_small": "depthwise, squeeze-excitation, hardswish",
    "mnasnet0_5": "depthwise; loads only with its state dict's version metadata",
    "regnet_x_400mf": "grouped convolutions",
    "googlenet": "channel concatenation (Inception blocks)",
    "efficientnet_b0": "squeeze-excitation, stochastic depth",
    "convnext_tiny": "LayerNorm and a bare per-channel layer-scale parameter",
    "squeezenet1_1": "a convolution as the classifier",
}
TIMM = {
    "resnet18": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "repvgg_a0": {"small_stem": False},  # re-parameterised; its two-branch stem keeps stride 2
}
CUSTOM = ["concat_net", "group_norm_net", "norm_head_net"]


def _spec(arch: str, name: str, **extra) -> dict:
    spec = {"arch": arch, "in_channels": 3, "image_size": 32, "num_classes": 10, **extra}
    if arch == "custom":
        spec["import_path"] = f"tests.arch_modules:{name}"
        import_factory(spec["import_path"], trust=True)  # what validating a pipeline naming it does
    else:
        spec[arch] = name
    return spec


def _slim(spec: dict, ratio: float = 0.4) -> tuple[nn.Module, nn.Module]:
    """(untrained model, its channel-pruned copy): global scope, so widths differ layer by layer."""
    torch.manual_seed(0)
    model = build_model(spec).eval()
    classifier = inspect(model, X[:1], 10).classifier
    assert classifier is not None
    slim = build_model(spec).eval()
    slim.load_state_dict(model.state_dict())
    plan = pruning.ChannelPlan("group_norm", "global", 0.9, [classifier], ["Conv2d", "Linear"])
    pruning.structured_prune(slim, X[:1], ratio, plan)
    return model, slim.eval()


def _round_trip(spec: dict, tmp_path: Path) -> nn.Module:
    model, slim = _slim(spec)
    assert sum(p.numel() for p in slim.parameters()) < 0.9 * sum(p.numel() for p in model.parameters())
    save_model(slim, spec, tmp_path / "slim.pt")
    rebuilt, _ = load_model(tmp_path / "slim.pt")
    with torch.no_grad():
        expected = slim(X)
        assert expected.shape == (2, 10)
        torch.testing.assert_close(rebuilt.eval()(X), expected, rtol=0, atol=1e-6)
    return slim


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_builder_slims_and_rebuilds(name: str, tmp_path: Path) -> None:
    _round_trip(_spec("torchvision", name), tmp_path)


def test_every_torchvision_builder_trains_on_plain_logits() -> None:
    """Training calls the model in train mode, where GoogLeNet (and Inception-v3) would return a
    namedtuple with auxiliary classifiers' logits: they are built without those heads."""
    for name in TORCHVISION:
        model = build_model(_spec("torchvision", name)).train()
        logits = model(X)
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10), name
        assert not any(n.startswith("aux") for n, _ in model.named_children()), name


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_model_slims_and_rebuilds(name: str, tmp_path: Path) -> None:
    _round_trip(_spec("timm", name, **TIMM[name]), tmp_path)


@pytest.mark.parametrize("name", CUSTOM)
def test_hand_written_model_slims_and_rebuilds(name: str, tmp_path: Path) -> None:
    _round_trip(_spec("custom", name), tmp_path)


def test_group_counts_stay_valid_where_group_norm_and_grouped_convolutions_meet(tmp_path: Path) -> None:
    """GroupNorm(4, C) and a convolution of 3 groups share channels: widths must be multiples of
    12 (torch-pruning 1.6 alone takes multiples of 4 and the convolution fails)."""
    _, slim = _slim(_spec("custom", "group_norm_net"), ratio=0.6)
    norms = [m for m in slim.modules() if isinstance(m, nn.GroupNorm)]
    convs = [m for m in slim.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert all(m.num_channels % m.num_groups == 0 for m in norms)
    assert all(m.in_channels % 12 == 0 and m.out_channels % 12 == 0 for m in convs)
    assert min(m.num_channels for m in norms) < 24  # something was cut


def test_state_dict_metadata_is_saved_and_older_files_still_load(tmp_path: Path) -> None:
    spec = _spec("torchvision", "mnasnet0_5")
    _, slim = _slim(spec)
    save_model(slim, spec, tmp_path / "mnasnet.pt")
    payload = torch.load(tmp_path / "mnasnet.pt", weights_only=True)
    assert payload["metadata"][""]["version"] == 2  # MNASNet refuses a state without it
    # a file written before the metadata was saved loads as before (for models that need none)
    spec = _spec("torchvision", "mobilenet_v3_small")
    _, slim = _slim(spec)
    save_model(slim, spec, tmp_path / "old.pt")
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    del payload["metadata"]
    torch.save(payload, tmp_path / "old.pt")
    rebuilt, _ = load_model(tmp_path / "old.pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(X), slim(X), rtol=0, atol=1e-6)


def test_a_model_whose_pruned_copy_cannot_run_is_found_before_training() -> None:
    """timm's MobileViT traces, but an even cut breaks its patch reshapes."""
    spec = _spec("timm", "mobilevit_xxs")
    model = build_model(spec).eval()
    classifier = inspect(model, X[:1], 10).classifier
    plan = pruning.ChannelPlan("group_norm", "uniform", 0.9, [classifier], ["Conv2d", "Linear"])
    _, problem = slim_problem(spec, model, X[:1], plan)
    assert problem is not None and "cannot run" in problem and "method: magnitude" in problem


REFUSED = """\
seed: 0
device: cpu
data: {{dataset: mnist, image_size: 32, channels: 3}}
stages:
  - stage: train
    model: {{torchvision: {model}}}
    epochs: 1
  - stage: prune
    name: slim
    method: structured
    amount: 0.3
"""


def test_builders_that_cannot_work_are_refused_by_validate_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """AlexNet cannot run at 32 px; torch-pruning cannot trace ShuffleNet's channel shuffle.
    ``--validate`` in-process (the CLI's own ``main``): what a user reads, without a second
    interpreter importing torch."""
    from compress.run import main

    expected = {
        "alexnet": [
            "stages[0] (train).model: torchvision alexnet cannot run on 3x32x32",
            "data.image_size: 64",
        ],
        "shufflenet_v2_x0_5": [
            "stages[1] (slim).method: structured pruning of shufflenet_v2_x0_5",
            "magnitude",
        ],
    }
    for model, parts in expected.items():
        cwd = tmp_path / model
        cwd.mkdir()
        write_pipeline(cwd, REFUSED.format(model=model), name="refused")
        monkeypatch.chdir(cwd)
        code = main(["refused.yaml", "--validate"])
        output = "".join(capsys.readouterr())
        assert code == 2, output
        lines = [line for line in output.strip().splitlines() if "warn" not in line.lower()]
        assert len(lines) == 1 and "Traceback" not in output, output
        for part in parts:
            assert part in lines[0], lines[0]
        assert not (cwd / "artifacts").exists() or not any((cwd / "artifacts").rglob("model.pt"))
