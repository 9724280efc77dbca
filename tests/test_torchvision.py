"""The architectures users bring: torchvision models by name through every stage, their stems
adapted to small images, depthwise/grouped convolutions pruned and reloaded exactly, MACs as
torchvision publishes them, and the user's own or pretrained weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from compress import measure, pruning
from compress.errors import ArtifactError
from compress.models import build_model, inspect, load_model, save_model
from compress.models.files import FORMAT
from tests.conftest import finish_cli, run_cli, start_cli, write_pipeline


def _spec(name: str, channels: int = 3, size: int = 32, classes: int = 10, **extra) -> dict:
    return {"arch": "torchvision", "torchvision": name, "in_channels": channels, "image_size": size,
            "num_classes": classes, **extra}  # fmt: skip


PIPELINE = """\
seed: 0
device: cpu
data: {{dataset: mnist, image_size: {size}, channels: 1, val_size: 64, limit_train: 256, limit_test: 128}}
stages:
  - stage: train
    model: {{torchvision: {name}}}
    epochs: 1
    batch_size: 32
    optimizer: {{name: adamw, lr: 0.002, weight_decay: 0.0001}}
  - stage: prune
    name: slim
    method: structured
    amount: 0.3
    round_to: 8
    finetune: {{epochs: 1, batch_size: 32, optimizer: {{name: adamw, lr: 0.001}}, schedule: cosine}}
{extra}  - stage: quantize
    from: [slim]
    modes: [static]
    calibration: {{images: 64}}
    tolerance: null
    latency: {{rounds: 1, runs: 1, batch_size: 8}}
  - stage: export
    formats: [onnx]
    parity_samples: 64
"""
DISTILL = """\
  - stage: distill
    student: {torchvision: mobilenet_v3_small}
    epochs: 1
    batch_size: 32
    optimizer: {name: adamw, lr: 0.002}
    control: false
"""


@pytest.fixture(scope="module")
def torchvision_runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, tuple]:
    """Both pipelines, started together (most of their time is single-threaded ONNX export)."""
    started = {}
    for name in ("mobilenet_v3_small", "resnet18"):
        cwd = tmp_path_factory.mktemp(name)
        extra = DISTILL if name == "resnet18" else ""  # a ResNet-18 teacher for a MobileNetV3 student
        size = 8 if name == "resnet18" else 16  # ResNet-18 at 16 px costs 140M MACs an image (stride-1 stem)
        pipeline = write_pipeline(cwd, PIPELINE.format(name=name, extra=extra, size=size), name="tv")
        started[name] = (start_cli(pipeline, "-q", cwd=cwd, data_root=data_root), cwd, size, extra)
    return {
        name: (finish_cli(proc, cwd, 900), cwd, size, extra)
        for name, (proc, cwd, size, extra) in started.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_every_stage_runs_on_a_torchvision_model(name: str, torchvision_runs) -> None:
    result, cwd, size, extra = torchvision_runs[name]
    assert result.returncode == 0, result.output
    run_dir = (cwd / "artifacts" / "tv" / "latest").resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    slim = manifest["variants"]["slim"]["metrics"]
    assert slim["macs"] < slim["macs_before"] and slim["parameters"] < slim["parameters_before"]
    base, _ = load_model(run_dir / "stages" / "train" / "model.pt")
    assert base.get_submodule(inspect(base, torch.zeros(1, 1, size, size)).stem).in_channels == 1
    model, _ = load_model(run_dir / "stages" / "slim" / "model.pt")
    dims = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    assert all(d % 8 == 0 for d in dims[1:])  # round_to: 8 (the stem is not a group root)
    export = json.loads((run_dir / "stages" / "export" / "export.json").read_text())
    expected = {"baseline", "slim", "slim.int8-static"} | ({"student"} if extra else set())
    assert set(export) == expected
    for variant, report in export.items():
        assert report["files"]["onnx"]["ok"], (variant, report)
    verify = run_cli(run_dir / "stages" / "export" / "deploy", cwd=cwd, module="compress.verify")
    assert verify.returncode == 0, verify.output


def test_depthwise_model_pruned_saved_and_reloaded_output_for_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = _spec("mobilenet_v2", channels=1)
    model = build_model(spec).eval()
    x = torch.randn(3, 1, 32, 32)
    plan = pruning.ChannelPlan(
        "group_norm", "global", 0.9, [inspect(model, x[:1], 10).classifier], ["Conv2d", "Linear"]
    )
    pruning.structured_prune(model, x[:1], 0.4, plan)
    depthwise = {
        n: m.groups for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
    }
    assert depthwise and all(
        model.get_submodule(n).in_channels == model.get_submodule(n).out_channels == g
        for n, g in depthwise.items()
    )
    assert any(g < 32 for g in depthwise.values())  # narrower than any unpruned depthwise layer
    save_model(model, spec, tmp_path / "slim.pt")
    reloaded, _ = load_model(tmp_path / "slim.pt")
    with torch.no_grad():
        assert torch.equal(model(x), reloaded.eval()(x))
    # a file without the recorded group counts (written before they were kept) reloads the same
    payload = torch.load(tmp_path / "slim.pt", weights_only=True)
    assert payload["format"] == FORMAT and payload["groups"] == depthwise
    del payload["groups"]
    torch.save(payload, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    with torch.no_grad():
        assert torch.equal(model(x), old.eval()(x))


def test_grouped_convolutions_reload_with_their_group_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = _spec("regnet_y_400mf")
    model = build_model(spec).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = pruning.ChannelPlan(
        "l2", "global", 0.9, [inspect(model, x[:1], 10).classifier], ["Conv2d", "Linear"]
    )
    pruning.structured_prune(model, x[:1], 0.3, plan)
    grouped = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert grouped
    save_model(model, spec, tmp_path / "slim.pt")
    reloaded, _ = load_model(tmp_path / "slim.pt")
    with torch.no_grad():
        assert torch.equal(model(x), reloaded.eval()(x))


def test_shufflenet_structured_pruning_is_a_clear_error() -> None:
    model = build_model(_spec("shufflenet_v2_x0_5"))
    plan = pruning.ChannelPlan("l1", "global", 0.9, ["fc"], ["Conv2d", "Linear"])
    with pytest.raises(pruning.UntraceableModel, match="torch-pruning cannot trace .* use method: magnitude"):
        pruning.structured_prune(model, torch.zeros(1, 3, 32, 32), 0.3, plan)


@pytest.mark.parametrize(
    "name", ["mobilenet_v3_small", "resnet18", "efficientnet_b0", "mobilenet_v2", "regnet_y_400mf"]
)
def test_macs_match_what_torchvision_publishes(name: str) -> None:
    published = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"] * 1e9  # GMACs at 224 px
    model = build_model(_spec(name, size=224, classes=1000))
    counted = measure.count_macs(model, torch.zeros(1, 3, 224, 224)).macs
    assert counted == pytest.approx(published, rel=0.015)


def test_small_images_get_a_stride_one_stem_without_max_pool() -> None:
    small = build_model(_spec("resnet18", channels=1, size=32))
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)
    assert small.conv1.in_channels == 1 and small.fc.out_features == 10
    large = build_model(_spec("resnet18", size=224))
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, torch.nn.MaxPool2d)
    kept = build_model(_spec("resnet18", size=32, small_stem=False))
    assert kept.conv1.stride == (2, 2)
    mobile = build_model(_spec("mobilenet_v3_small", size=32))
    assert mobile.features[0][0].stride == (1, 1) and mobile.classifier[3].out_features == 10


def test_pretrained_weights_from_a_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18()  # a stand-in for a downloaded ImageNet file
    torch.save(imagenet.state_dict(), tmp_path / "resnet18-imagenet.pth")
    monkeypatch.chdir(tmp_path)
    model = build_model(_spec("resnet18", channels=1, weights="resnet18-imagenet.pth"), pretrained=True)
    assert torch.allclose(model.conv1.weight, imagenet.conv1.weight.sum(1, keepdim=True))  # RGB summed
    assert torch.equal(model.layer3[0].conv1.weight, imagenet.layer3[0].conv1.weight)
    assert model.fc.out_features == 10  # the 1000-class classifier is not taken
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "other.pth")
    with pytest.raises(ArtifactError, match="model.weights: the pretrained weights are for another arch"):
        build_model(_spec("resnet18", weights="other.pth"), pretrained=True)


def test_offline_weights_name_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(
        ArtifactError, match="must come from https://download.pytorch.org/.*model.weights: PATH"
    ):
        build_model(_spec("resnet18", weights="IMAGENET1K_V1"), pretrained=True)


# ---------------------------------------------------------------- the user's own weights

USER_PIPELINE = """\
device: cpu
data: {{dataset: mnist, image_size: 32, channels: 3, val_size: 50, limit_train: 100, limit_test: 64}}
stages:
  - stage: train
    model: {{torchvision: resnet18, small_stem: false}}
    init: {init}
    epochs: 0
"""


@pytest.mark.slow
def test_a_users_state_dict_from_a_plain_torch_script(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=10).eval()  # trained elsewhere, saved the usual ways
    torch.save(theirs.state_dict(), tmp_path / "model.pth")
    wrapped = {f"module.{k}": v for k, v in theirs.state_dict().items()}  # saved from DataParallel
    torch.save({"epoch": 30, "model_state_dict": wrapped, "optimizer_state_dict": {}}, tmp_path / "ckpt.pt")
    pipeline = write_pipeline(tmp_path, USER_PIPELINE.format(init="ckpt.pt"), name="mine")
    result = run_cli(pipeline, "-q", cwd=tmp_path, data_root=data_root)
    assert result.returncode == 0, result.output
    ours, _ = load_model(tmp_path / "artifacts" / "mine" / "latest" / "stages" / "train" / "model.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs(x))
    # the plain state dict file is read the same way (in-process: no second run needed)
    from compress.config import load_pipeline
    from compress.stages import config_registry
    from compress.stages.train import init_state

    plain = write_pipeline(tmp_path, USER_PIPELINE.format(init="model.pth"), name="plain")
    monkeypatch.chdir(tmp_path)
    state, _, ours_file = init_state(load_pipeline(plain, config_registry()).stages[0])
    assert not ours_file and all(torch.equal(state[k], v) for k, v in theirs.state_dict().items())


def test_a_state_dict_that_does_not_fit_is_refused_with_its_keys(tmp_path: Path, data_root: Path) -> None:
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "imagenet.pth")  # 1000 classes
    pipeline = write_pipeline(tmp_path, USER_PIPELINE.format(init="imagenet.pth"), name="mine")
    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 2, result.output
    assert "init: the weights in imagenet.pth do not fit the model" in result.stderr
    assert "2 shapes differ: fc.weight (1000, 512) vs the model's (10, 512), fc.bias (1000,)" in result.stderr
    assert "Traceback" not in result.output


def test_timm_model_by_name_is_adapted_pruned_and_reloaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = {
        "arch": "timm",
        "timm": "mobilenetv3_small_050",
        "in_channels": 1,
        "image_size": 32,
        "num_classes": 10,
    }
    model = build_model(spec).eval()
    anatomy = inspect(model, torch.zeros(1, 1, 32, 32), 10)
    assert anatomy.classifier == "classifier" and model.get_submodule(anatomy.stem).stride == (1, 1)
    x = torch.randn(2, 1, 32, 32)
    plan = pruning.ChannelPlan("l2", "global", 0.9, [anatomy.classifier], ["Conv2d", "Linear"], round_to=8)
    pruning.structured_prune(model, x[:1], 0.3, plan)
    save_model(model, spec, tmp_path / "slim.pt")
    reloaded, _ = load_model(tmp_path / "slim.pt")
    with torch.no_grad():
        assert torch.equal(model(x), reloaded.eval()(x))
