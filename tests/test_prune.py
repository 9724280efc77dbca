"""Stage ``prune``: real zeros after magnitude pruning, a smaller model after channel pruning,
and bad settings rejected with the YAML key named, before any training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from compress import measure, pruning
from compress.config import DataConfig
from compress.data import load_data
from compress.fileio import sha256_file
from compress.measure import count_parameters
from compress.models import build_model, load_model, save_model
from compress.ship import convert
from tests.conftest import TINY_PIPELINE, run_cli, write_pipeline

PRUNE_STAGES = """\
  - stage: prune
    method: magnitude
    amount: 0.8
    steps: 3
    sensitivity: true
    finetune: {epochs: 1, optimizer: {lr: 0.01}}
  - stage: prune
    name: slim
    method: structured
    target_macs_reduction: 2.0
    finetune: {epochs: 1, optimizer: {lr: 0.01}}
"""


def _reuse_baseline(tiny_run, tmp_path: Path) -> Path:
    """A copy of the tiny run's artifacts, so the baseline is a cache hit, not retrained."""
    shutil.copytree(tiny_run.cwd / "artifacts", tmp_path / "artifacts", symlinks=True)
    return tmp_path


@pytest.fixture(scope="module")
def pruned_run(tiny_run, data_root, tmp_path_factory):
    cwd = _reuse_baseline(tiny_run, tmp_path_factory.mktemp("prune"))
    pipeline = write_pipeline(cwd, TINY_PIPELINE + PRUNE_STAGES)
    result = run_cli(pipeline, cwd=cwd, data_root=data_root)
    assert result.returncode == 0, result.output
    assert "train            cached" in result.stdout
    run_dir = (cwd / "artifacts" / "tiny" / "latest").resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return cwd, run_dir, manifest


def test_pruning_sensitivity_has_one_row_per_layer_measured_alone(pruned_run, data_root):
    """Distiller's analysis: each prunable layer alone pruned to the stage's 0.8, all others
    dense, scored on the validation split; recomputed here from the baseline file."""
    from compress.measure import evaluate
    from compress.pruning import masks
    from compress.report.charts import pruning_sensitivity_chart

    _, run_dir, manifest = pruned_run
    record = json.loads((run_dir / "stages" / "prune" / "result.json").read_text())
    rows = record["variants"][0]["info"]["layer_sensitivity"]
    baseline, _ = load_model(run_dir / "stages" / "train" / "model.pt")
    layers = [n for n, m in baseline.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert [r["layer"] for r in rows] == layers
    bundle = load_data(
        DataConfig(dataset="mnist", val_size=1000, limit_train=2000, limit_test=1000), data_root
    )
    reference = evaluate(baseline, bundle, bundle.val, torch.device("cpu"))["accuracy"]
    per_layer = manifest["variants"]["pruned"]["metrics"]
    shipped = record["variants"][0]["info"]["per_layer_sparsity"]
    for row in rows:
        probe, _ = load_model(run_dir / "stages" / "train" / "model.pt")
        masks.magnitude_masks({row["layer"]: probe.get_submodule(row["layer"])}, 0.8, {})
        accuracy = evaluate(probe, bundle, bundle.val, torch.device("cpu"))["accuracy"]
        assert row["val_accuracy"] == pytest.approx(accuracy, abs=1e-9), row
        assert row["drop_pp"] == pytest.approx((reference - accuracy) * 100, abs=1e-3), row
        assert row["sparsity"] == 0.8 and row["shipped_sparsity"] == shipped[row["layer"]]
    assert per_layer["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert max(r["drop_pp"] for r in rows) > 0  # 80 % of one layer's weights gone costs something
    chart = pruning_sensitivity_chart({"pruned": rows})
    assert chart is not None and chart["title"] == "Per-layer pruning sensitivity"


def _onnx_weight_zeros(path: Path) -> tuple[int, int]:
    zeros = total = 0
    for init in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim >= 2:  # Conv and Linear weights; biases stay dense
            zeros += int((array == 0).sum())
            total += array.size
    return zeros, total


def test_magnitude_saved_weights_hold_the_sparsity(pruned_run, tmp_path):
    cwd, run_dir, manifest = pruned_run
    metrics = manifest["variants"]["pruned"]["metrics"]
    model, spec = load_model(run_dir / "stages" / "prune" / "model.pt")
    onnx_path = convert.export_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "pruned.onnx")
    zeros, total = _onnx_weight_zeros(onnx_path)
    assert total == metrics["prunable_weights"]
    assert zeros / total == pytest.approx(0.8, abs=1e-3)
    assert metrics["sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    assert metrics["nonzero_parameters"] < 0.25 * metrics["parameters"]
    baseline = manifest["variants"]["baseline"]["metrics"]["test_accuracy"]
    assert metrics["test_accuracy"] > baseline - 0.05, (metrics, baseline)
    published = json.loads((cwd / "reports" / "tiny" / "pruned.per_layer_sparsity.json").read_text())
    assert set(published["layers"]) == {"features.0", "features.3", "head.0", "classifier"}
    assert published["overall"] == pytest.approx(metrics["sparsity"])


def test_structured_model_is_smaller_and_exports(pruned_run, tmp_path):
    _, run_dir, manifest = pruned_run
    base, _ = load_model(run_dir / "stages" / "train" / "model.pt")
    slim, _ = load_model(run_dir / "stages" / "slim" / "model.pt")
    x = torch.randn(16, 1, 28, 28)
    macs0, params0 = measure.count_macs(base, x[:1]).macs, measure.count_parameters(base)
    macs1, params1 = measure.count_macs(slim, x[:1]).macs, measure.count_parameters(slim)
    assert macs1 <= macs0 / 2 and params1 < params0
    metrics = manifest["variants"]["slim"]["metrics"]
    assert (metrics["macs"], metrics["parameters"], metrics["macs_before"]) == (macs1, params1, macs0)
    assert slim.classifier.out_features == 10
    onnx_path = convert.export_onnx(slim, x[:1], tmp_path / "slim.onnx")
    ts_path = convert.export_torchscript(slim, x[:1], tmp_path / "slim.pt")
    with torch.no_grad():
        expected = slim.eval()(x).numpy()
        traced = torch.jit.load(str(ts_path))(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {convert.INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(traced, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["lenet5", "lenet300", "resnet20"])
def test_channel_pruned_models_reload_from_plain_state_dict(arch, tmp_path):
    spec = {"arch": arch, "width": 1.0, "in_channels": 1, "image_size": 28, "num_classes": 10}
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.randn(4, 1, 28, 28)
    plan = pruning.ChannelPlan("group_norm", "global", 0.9, ["classifier"], ["Linear", "Conv2d"])
    before = count_parameters(model)
    pruning.structured_prune(model, x[:1], 0.5, plan)
    assert count_parameters(model) < 0.6 * before
    save_model(model, spec, tmp_path / "slim.pt")
    again, _ = load_model(tmp_path / "slim.pt")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model(x))


KD_STAGES = """\
  - stage: prune
    name: hard
    output: hard
    amount: 0.8
    steps: 3
    finetune: {epochs: 1, optimizer: {lr: 0.01}}
  - stage: prune
    name: kd0
    output: kd0
    amount: 0.8
    steps: 3
    finetune: {epochs: 1, optimizer: {lr: 0.01}}
    distill: {temperature: 4, alpha: 0.0}
  - stage: prune
    name: kd
    output: kd
    amount: 0.8
    steps: 3
    finetune: {epochs: 1, optimizer: {lr: 0.01}}
    distill: {temperature: 4, alpha: 0.9}
"""


def _kl_to(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        t = torch.log_softmax(teacher.eval()(x), 1)
        s = torch.log_softmax(student.eval()(x), 1)
    return torch.nn.functional.kl_div(s, t, reduction="batchmean", log_target=True).item()


@pytest.mark.slow
def test_distilled_finetuning_learns_from_the_unpruned_input(tiny_run, data_root, tmp_path):
    """alpha 0 is exactly the hard-label fine-tuning (same batches, same masks), so the only
    difference alpha 0.9 makes is the teacher's soft labels: the pruned model ends closer to
    its unpruned input's predictions, and the input is not changed by teaching."""
    cwd = _reuse_baseline(tiny_run, tmp_path)
    baseline_sha = sha256_file(tiny_run.baseline)
    pipeline = write_pipeline(cwd, TINY_PIPELINE + KD_STAGES)
    result = run_cli(pipeline, cwd=cwd, data_root=data_root)
    assert result.returncode == 0, result.output
    run_dir = (cwd / "artifacts" / "tiny" / "latest").resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    models = {n: load_model(run_dir / "stages" / n / "model.pt")[0] for n in ("hard", "kd0", "kd")}
    for name, other in (("kd0", models["kd0"]), ("kd", models["kd"])):
        assert set(other.state_dict()) == set(models["hard"].state_dict()), name
    same = all(
        torch.equal(a, b)
        for a, b in zip(
            models["hard"].state_dict().values(), models["kd0"].state_dict().values(), strict=True
        )
    )
    assert same, "alpha 0 must be the plain cross-entropy fine-tuning"
    assert not all(
        torch.equal(a, b)
        for a, b in zip(models["hard"].state_dict().values(), models["kd"].state_dict().values(), strict=True)
    )

    teacher, _ = load_model(tiny_run.baseline)
    bundle = load_data(DataConfig(dataset="mnist", val_size=1000, limit_test=1000), data_root)
    x = bundle.normalize(bundle.test.x)
    kl_hard, kl_kd = _kl_to(teacher, models["hard"], x), _kl_to(teacher, models["kd"], x)
    assert kl_kd < 0.5 * kl_hard, (kl_kd, kl_hard)
    assert sha256_file(tiny_run.baseline) == baseline_sha
    assert manifest["variants"]["kd"]["metrics"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    for name, recorded in (("kd", {"temperature": 4.0, "alpha": 0.9}), ("hard", None)):
        stage_result = json.loads((run_dir / "stages" / name / "result.json").read_text())
        assert stage_result["variants"][0]["info"]["distill"] == recorded


def test_magnitude_masks_respect_layer_limits():
    torch.manual_seed(0)
    model = build_model({"arch": "lenet300", "in_channels": 1, "image_size": 28, "num_classes": 10})
    layers = pruning.prunable_layers(model, ["Linear"])
    with torch.no_grad():
        model.classifier.weight.mul_(1e-3)  # the global threshold alone would empty it
    masks = pruning.magnitude_masks(layers, 0.9, {"classifier": 0.5})
    sparsity, per_layer = pruning.layer_sparsity(layers)
    assert sparsity == pytest.approx(0.9, abs=1e-5)
    assert per_layer["classifier"] == pytest.approx(0.5, abs=1e-3)
    assert all(bool((layers[n].weight[~m] == 0).all()) for n, m in masks.items())


BAD_FIELDS = """\
  - stage: prune
    amount: 1.5
  - stage: prune
    name: p2
    output: p2
    layer_types: [Linear, Conv3d]
"""

BAD_COMBINATIONS = """\
  - stage: prune
    method: structured
    amount: 0.5
    target_macs_reduction: 2.0
  - stage: prune
    name: p2
    output: p2
    schedule: oneshot
    steps: 3
  - stage: prune
    name: p3
    output: p3
    schedule: oneshot
    finetune: null
    distill: {alpha: 0.9}
"""


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (BAD_FIELDS, ["stages[1] (prune).amount:", "stages[2] (p2).layer_types[1]:"]),
        (
            BAD_COMBINATIONS,
            [
                "stages[1] (prune).target_macs_reduction: give either",
                "stages[2] (p2).steps: schedule oneshot",
                "stages[3] (p3).distill: distils during fine-tuning; it needs a finetune: section",
            ],
        ),
    ],
)
def test_static_errors_name_the_key(stages, expected, tmp_path):
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE + stages)
    result = run_cli(pipeline, "--validate", cwd=tmp_path)
    assert result.returncode == 2, result.output
    for text in expected:
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (
            "method: structured\n    target_macs_reduction: 500",
            "stages[1] (prune).target_macs_reduction: 500.0x is unreachable",
        ),
        (
            "layer_sparsity_limits: {fc9: 0.5}",
            "stages[1] (prune).layer_sparsity_limits: no layer named 'fc9'",
        ),
    ],
)
def test_model_dependent_errors_before_training(stage, expected, tiny_run, data_root, tmp_path):
    cwd = _reuse_baseline(tiny_run, tmp_path)
    pipeline = write_pipeline(cwd, TINY_PIPELINE + f"  - stage: prune\n    {stage}\n")
    result = run_cli(pipeline, cwd=cwd, data_root=data_root)
    assert result.returncode == 2, result.output
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not list((cwd / "artifacts").rglob("prune-*/work/*/checkpoint.pt"))  # no fine-tuning began
