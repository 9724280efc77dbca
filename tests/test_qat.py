"""Quantization-aware training (quantize modes ``qat`` and ``auto``): through the CLI on MNIST, the
freezing points on a batch-norm network, and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compress.models import build_model
from compress.quantization import qat
from compress.run import main
from tests.conftest import run_cli, write_pipeline

PIPELINE = """\
seed: 0
device: cpu
data:
  dataset: mnist
  val_size: 1000
  limit_train: 2000
  limit_test: 1000
stages:
  - stage: train
    model: {arch: lenet5, width: 0.5}
    epochs: 1
    optimizer: {name: sgd, lr: 0.05}
  - stage: quantize
    from: [baseline]
    modes: [qat, auto]
    tolerance: 5.0
    calibration: {images: 256}
    latency: {rounds: 2, runs: 1}
    qat: {epochs: 1, batch_size: 100, distill: {temperature: 4, alpha: 0.5}, freeze_observers_at: 0.5}
  - stage: quantize
    name: harsh
    from: [baseline]
    modes: [auto]
    suffix: w2
    tolerance: 0.0
    calibration: {images: 256}
    latency: {rounds: 1, runs: 1}
    qat: {epochs: 1, weight_bits: 2}
"""


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    cwd = tmp_path_factory.mktemp("qat")
    pipeline = write_pipeline(cwd, PIPELINE, name="qat")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESS_DATA_ROOT", str(data_root))
        mp.chdir(cwd)
        assert main([str(pipeline), "-q"]) == 0
    return (cwd / "artifacts" / "qat" / "latest").resolve()


def _record(run_dir: Path, stage: str, name: str) -> dict:
    return json.loads((run_dir / "stages" / stage / "quantize.json").read_text())["variants"][name]


def _ort_ops(path: Path, tmp_path: Path) -> set[str]:
    """The op types in onnxruntime's own optimised graph of ``path`` (asked independently of ours)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}


@pytest.mark.slow
def test_qat_variant_is_a_qdq_onnx_that_onnxruntime_runs_in_int8(qat_run: Path, tmp_path: Path) -> None:
    record = _record(qat_run, "quantize", "baseline.int8-qat")
    metrics = record["metrics"]
    file = qat_run / "stages" / "quantize" / "baseline.int8-qat.onnx"
    graph = {n.op_type for n in onnx.load(str(file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= graph
    ops = _ort_ops(file, tmp_path)
    assert {"QLinearConv", "QGemm"} & ops, ops  # fused into int8 kernels, not float between QDQ pairs
    assert metrics["runs_in_int8"] and metrics["int8_kernels"]
    assert metrics["quantization_method"] == "qat"
    assert metrics["int8_initializers"] >= 3  # both convolutions and the first linear layer
    parity = metrics["qdq_parity"]
    assert parity["ok"] and parity["max_abs_diff"] <= parity["atol"] and parity["top1_agreement"] >= 0.99
    # the accuracy recorded is the shipped file's, run here again in onnxruntime
    manifest = json.loads((qat_run / "manifest.json").read_text())
    assert manifest["variants"]["baseline.int8-qat"]["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((3, 1, 28, 28), np.float32)})[0]
    assert logits.shape == (3, 10)
    training = metrics["qat"]
    assert training["steps"] == 20 and training["observers_frozen_at_step"] == 10  # 2,000 / 100, half way
    assert training["distill"] == {"temperature": 4.0, "alpha": 0.5}


@pytest.mark.slow
def test_auto_keeps_ptq_when_it_meets_the_tolerance_and_trains_when_it_does_not(qat_run: Path) -> None:
    kept = _record(qat_run, "quantize", "baseline.int8-auto")
    assert kept["metrics"]["quantization_method"] == "ptq" and kept["metrics"]["qat_needed"] is False
    assert [t["note"].split(" (")[0] for t in kept["accuracy_tries"]] == ["static PTQ"]
    assert kept["metrics"]["qat"] is None
    # 2-bit weight grids at zero tolerance: PTQ cannot meet it, so QAT runs and is shipped
    trained = _record(qat_run, "harsh", "baseline.w2-auto")
    tries = trained["accuracy_tries"]
    assert [t["meets_tolerance"] for t in tries][:1] == [False] and len(tries) == 2
    assert trained["metrics"]["quantization_method"] == "qat" and trained["metrics"]["qat_needed"]
    assert trained["metrics"]["ptq_drop_val_pp"] > 0
    assert [t["method"] for t in tries] == ["ptq", "qat"]
    assert trained["metrics"]["val_accuracy"] == tries[1]["val_accuracy"] > tries[0]["val_accuracy"]
    assert trained["metrics"]["ptq_test_accuracy"] == tries[0]["test_accuracy"] is not None
    assert trained["metrics"]["test_accuracy"] == tries[1]["test_accuracy"]
    init = onnx.load(str(qat_run / "stages" / "harsh" / "baseline.w2-auto.onnx")).graph.initializer
    weights = [onnx.numpy_helper.to_array(i) for i in init if i.data_type == onnx.TensorProto.INT8 and i.dims]
    big = [w for w in weights if w.ndim > 1]
    assert big and all(w.min() >= -2 and w.max() <= 1 for w in big)  # a 2-bit grid in int8 storage


@pytest.mark.slow
def test_freezer_stops_observers_and_batch_norm_statistics_and_survives_train() -> None:
    torch.manual_seed(0)
    model = build_model(
        {"arch": "resnet20", "width": 0.25, "in_channels": 1, "image_size": 28, "num_classes": 10}
    )
    prepared = qat.prepare(model, torch.randn(2, 1, 28, 28))
    freezer = qat.Freezer(prepared, observers_at=1, bn_at=2)
    buffers = dict(prepared.named_buffers())
    means = [k for k in buffers if k.endswith("running_mean")]
    scales = [k for k in buffers if k.endswith(".scale") and "activation_post_process" in k]
    assert means and scales

    def step() -> dict[str, torch.Tensor]:
        prepared.train()
        prepared(torch.randn(8, 1, 28, 28) * 3 + 1)
        freezer()
        return {k: v.clone() for k, v in prepared.named_buffers()}

    first = step()  # the observers freeze after this step
    second = step()
    assert all(torch.equal(first[k], second[k]) for k in scales)
    assert not all(torch.equal(first[k], second[k]) for k in means)  # batch norms froze after step 2
    third = step()
    prepared.eval()
    prepared.train()  # fit's next epoch: the freeze must survive the switch
    fourth = step()
    assert all(torch.equal(third[k], fourth[k]) for k in means)
    assert freezer.frozen == {"observers": 1, "batch_norm": 2}


def test_keep_zeros_keeps_a_pruned_parent_sparse() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        model[1].weight[:, :8] = 0
    prepared = qat.prepare(model, torch.randn(2, 1, 4, 4))
    hook = qat.keep_zeros(prepared)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.5)
    prepared(torch.randn(8, 1, 4, 4)).sum().backward()
    optimizer.step()
    hook()
    weight = next(p for p in prepared.parameters() if p.dim() == 2)
    assert torch.count_nonzero(weight[:, :8]) == 0 and torch.count_nonzero(weight[:, 8:]) > 0


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("backend: pytorch\n    modes: [qat]", "need backend: onnxruntime"),
        ("modes: [auto]\n    tolerance: null", "set tolerance"),
        ("modes: [static]\n    qat: {epochs: 1}", "add one of them to modes"),
        ("modes: [qat]\n    qat: {weight_bits: 9}", "weight_bits"),
    ],
)
def test_bad_qat_settings_fail_before_anything_runs(tmp_path: Path, block: str, message: str) -> None:
    text = f"stages:\n  - stage: train\n    epochs: 1\n  - stage: quantize\n    {block}\n"
    result = run_cli(write_pipeline(tmp_path, text), "--validate", cwd=tmp_path)
    assert result.returncode == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert "stages[1] (quantize)" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_qat_on_torchvision_architectures_runs_in_int8(arch: str, tmp_path: Path) -> None:
    """Residual adds with a reused ReLU (ResNet), depthwise convs, hardswish and
    squeeze-excitation (MobileNetV3): prepared, trained two steps, frozen, converted and run."""
    torch.manual_seed(0)
    spec = {"arch": "torchvision", "torchvision": arch, "in_channels": 3, "image_size": 32, "num_classes": 10}
    model = build_model(spec)
    x = torch.randn(8, 3, 32, 32)
    prepared = qat.prepare(model, x[:2])
    freezer = qat.Freezer(prepared, observers_at=1, bn_at=1)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    for _ in range(2):
        prepared.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(prepared(x), torch.arange(8) % 10).backward()
        optimizer.step()
        freezer()
    converted = qat.convert(prepared)
    path = qat.export_qdq(converted, x[:2], tmp_path / f"{arch}.onnx", {})
    kernels = qat.int8_kernels(path, tmp_path / "optimized.onnx")
    assert kernels.get("QLinearConv", 0) >= 10, kernels
    reference = converted(x).detach().numpy()
    produced = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()}
    )[0]
    # untrained weights give small logits, so int8 rounding across 20 layers is a larger share of
    # them than on a trained model (the stage's bound is 1 %); a wrong graph would be far off
    assert np.abs(reference - produced).max() <= 0.1 * np.abs(reference).max()


def test_static_pt2e_quantizes_a_resnet_whose_relu_module_is_called_twice() -> None:
    from compress.quantization import torchao

    model = build_model(
        {
            "arch": "torchvision",
            "torchvision": "resnet18",
            "in_channels": 3,
            "image_size": 32,
            "num_classes": 10,
        }
    ).eval()
    x = torch.randn(4, 3, 32, 32)
    quantized = torchao.pt2e_static(model, x[:2], x)
    targets = {str(n.target) for n in quantized.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets)
    assert quantized(x).shape == (4, 10)
