"""The quantize stage: int8 ONNX / PyTorch variants, calibrated on training images only.

One small pipeline (a 1-epoch LeNet-300-100 on 2,000 MNIST images) runs in-process once for
the module, with onnxruntime's ``quantize_static`` spied on, so the tests can check both the
files written and exactly which images calibration saw.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compress import quantization
from compress.config import DataConfig
from compress.data import load_data
from compress.run import main
from compress.stages.quantize import QuantizeConfig
from tests.conftest import run_cli, write_pipeline

DATA = """\
seed: 0
device: cpu
data:
  dataset: mnist
  val_size: 1000
  limit_train: 2000
  limit_test: 1000
"""

DATA_SPEC = DataConfig(dataset="mnist", val_size=1000, limit_train=2000, limit_test=1000)

PIPELINE = (
    DATA
    + """\
stages:
  - stage: train
    model: {arch: lenet300}
    epochs: 1
    optimizer: {name: sgd, lr: 0.05}
  - stage: quantize
    from: [baseline]
    modes: [dynamic, static]
    calibration: {images: 256}
    latency: {rounds: 2, runs: 1}
  - stage: quantize
    name: strict
    modes: [static]
    suffix: int8-strict
    tolerance: 0
    sensitivity: true
    calibration: {images: 32, method: percentile, percentile: 90}
    latency: {rounds: 1, runs: 1}
  - stage: quantize
    name: quantize-pt
    backend: pytorch
    modes: [dynamic, static, weight-only]
    tolerance: null
    calibration: {images: 128}
    latency: {rounds: 1, runs: 1}
"""
)


class Run:
    def __init__(self, cwd: Path, fed: list[np.ndarray], exit_code: int):
        self.cwd, self.fed, self.exit_code = cwd, fed, exit_code
        self.run_dir = (cwd / "artifacts" / "quant" / "latest").resolve()
        self.manifest = json.loads((self.run_dir / "manifest.json").read_text())

    def stage_dir(self, label: str) -> Path:
        return (self.run_dir / "stages" / label).resolve()

    def record(self, label: str, name: str) -> dict:
        return json.loads((self.stage_dir(label) / "quantize.json").read_text())["variants"][name]


@pytest.fixture(scope="module")
def qrun(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Run:
    """Run the pipeline in this process with a spy on the static quantizer's calibration feed."""
    cwd = tmp_path_factory.mktemp("quant")
    pipeline = write_pipeline(cwd, PIPELINE, name="quant")
    fed: list[np.ndarray] = []
    real = quantization.ort.quantize_static

    def spy(model_input, model_output, reader, *args, **kwargs):
        inner = reader.get_next

        def recording_get_next():
            batch = inner()
            if batch is not None:
                fed.append(next(iter(batch.values())).copy())
            return batch

        reader.get_next = recording_get_next
        return real(model_input, model_output, reader, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantization.ort, "quantize_static", spy)  # where quantize_onnx_static looks it up
        mp.setenv("COMPRESS_DATA_ROOT", str(data_root))
        mp.chdir(cwd)
        code = main([str(pipeline), "-q"])
    assert code == 0, (cwd / "artifacts").as_posix()
    return Run(cwd, fed, code)


def _image_hashes(images_uint8: torch.Tensor) -> set[str]:
    flat = images_uint8.reshape(len(images_uint8), -1).numpy()
    return {hashlib.sha256(row.tobytes()).hexdigest() for row in flat}


def test_static_calibration_sees_only_training_images(qrun: Run, data_root: Path) -> None:
    bundle = load_data(DATA_SPEC, data_root)
    train, val, test = (_image_hashes(s.x) for s in (bundle.train, bundle.val, bundle._test))
    # the check has teeth: the splits really are distinguishable by content
    assert len(test - train) > 900 and len(val - train) > 900

    assert qrun.fed, "quantize_static was never fed calibration data"
    fed = np.concatenate(qrun.fed)
    # undo the bundle's normalisation to get the raw pixels back
    mean, std = bundle.mean[0], bundle.std[0]
    pixels = torch.from_numpy(np.rint((fed * std + mean) * 255)).clamp(0, 255).to(torch.uint8)
    seen = _image_hashes(pixels)
    assert seen <= train, f"{len(seen - train)} calibration images are not training images"
    assert not (seen & (test - train)), "test images leaked into calibration"
    assert not (seen & (val - train)), "validation images leaked into calibration"
    # 256 distinct images; the strict stage's 32 are the start of the same seeded draw
    assert len(seen) == 256
    metrics = qrun.manifest["variants"]["baseline.int8-static"]["metrics"]
    assert metrics["calibration_images"] == 256


def test_int8_onnx_has_int8_weights_and_is_about_4x_smaller(qrun: Run) -> None:
    directory = qrun.stage_dir("quantize")
    fp32 = directory / "baseline" / "fp32.onnx"
    for mode in ("dynamic", "static"):
        name = f"baseline.int8-{mode}"
        path = directory / f"{name}.onnx"
        model = onnx.load(str(path))
        int8 = [
            i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2
        ]
        weights = sum(int(np.prod(i.dims)) for i in int8)
        # the accuracy fallback may keep a small layer in fp32: those weights stay float matrices
        float_matrices = [
            i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
        ]
        kept = sum(int(np.prod(i.dims)) for i in float_matrices)
        assert weights + kept == 266_200, f"{name}: {weights} int8 + {kept} fp32 weights"  # LeNet-300-100
        assert weights >= 0.95 * 266_200, f"{name}: only {weights} int8 weights"
        ratio = fp32.stat().st_size / path.stat().st_size
        assert 3.5 <= ratio <= 4.3, f"{name}: {ratio:.2f}x smaller than fp32"
        metrics = qrun.record("quantize", name)["metrics"]
        assert metrics["size_ratio"] == pytest.approx(ratio, rel=1e-3)
        assert metrics["fp32_file_bytes"] == fp32.stat().st_size
        assert abs(metrics["delta_test_pp"]) < 3.0, metrics
        # the recorded accuracy is what onnxruntime computes on the test split
        bundle = load_data(DATA_SPEC, Path(qrun.manifest["data"]["resolved_root"]))
        assert quantization.onnx_accuracy(path, bundle, bundle._test)["accuracy"] == metrics["test_accuracy"]
        assert isinstance(metrics["slower_than_parent"], bool)
        assert metrics["latency_ms_p50"] > 0 and metrics["fp32_latency_ms_p50"] > 0


def test_zero_tolerance_forces_layers_into_fp32(qrun: Run) -> None:
    record = qrun.record("strict", "baseline.int8-strict-static")
    tries = record["accuracy_tries"]
    assert tries[0]["fp32_layers"] == [] and not tries[0]["meets_tolerance"], tries[0]
    assert len(tries) >= 2
    assert record["metrics"]["fp32_layers"], "a 0 pp tolerance should keep at least one layer in fp32"
    assert record["metrics"]["fp32_layers"] == tries[-1]["fp32_layers"]
    assert tries[-1]["val_accuracy"] > tries[0]["val_accuracy"]
    assert {row["layer"] for row in record["sensitivity"]} == set(
        record["metrics"]["fp32_layers"] + record["metrics"]["quantized_layers"]
    )
    # the excluded layers really read float weights in the shipped file, the others int8 ones
    for label, name in (("strict", "baseline.int8-strict-static"), ("quantize", "baseline.int8-static")):
        model = onnx.load(str(qrun.stage_dir(label) / f"{name}.onnx"))
        floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
        weight_of = {n.name: n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Conv")}
        metrics = qrun.record(label, name)["metrics"]
        assert all(weight_of[layer] in floats for layer in metrics["fp32_layers"])
        assert all(weight_of[layer] not in floats for layer in metrics["quantized_layers"])
    assert qrun.record("quantize", "baseline.int8-static")["metrics"]["quantized_layers"]


def test_layer_sensitivity_has_one_row_per_weight_layer_and_marks_the_fallbacks_choice(qrun: Run) -> None:
    record = qrun.record("strict", "baseline.int8-strict-static")
    table = record["layer_sensitivity"]
    metrics = record["metrics"]
    layers = metrics["fp32_layers"] + metrics["quantized_layers"]
    assert {row["layer"] for row in table} == set(layers) and len(table) == 3  # LeNet-300-100's Gemms
    assert {row["layer"] for row in table if row["kept_fp32"]} == set(metrics["fp32_layers"])
    parent = metrics["parent_val_accuracy"]
    for row in table:
        assert 0 <= row["val_accuracy"] <= 1
        assert row["drop_pp"] == pytest.approx(100 * (parent - row["val_accuracy"]), abs=1e-3)
    assert "layer_sensitivity" in qrun.record("quantize", "baseline.int8-static")  # off: an empty table
    assert qrun.record("quantize", "baseline.int8-static")["layer_sensitivity"] == []


def test_pytorch_backend_saves_reloadable_int8_programs(qrun: Run) -> None:
    directory = qrun.stage_dir("quantize-pt")
    for mode in ("dynamic", "static"):
        name = f"baseline.pt-int8-{mode}"
        record = qrun.record("quantize-pt", name)
        assert record["metrics"]["saved"], record
        assert "torchao" in record["path"]
        assert qrun.manifest["variants"][name]["format"] == "pt2"
        program = torch.export.load(str(directory / f"{name}.pt2")).module()
        logits = program(torch.zeros(3, 1, 28, 28))
        assert logits.shape == (3, 10)
        assert abs(record["metrics"]["delta_test_pp"]) < 3.0
    static = torch.export.load(str(directory / "baseline.pt-int8-static.pt2"))
    dtypes = {t.dtype for t in [*static.state_dict.values(), *static.constants.values()]}
    assert torch.int8 in dtypes
    assert qrun.record("quantize-pt", "baseline.pt-int8-static")["metrics"]["size_ratio"] > 2.5


def test_weight_only_int8_quantizes_linear_weights_and_keeps_activations_float(qrun: Run) -> None:
    name = "baseline.pt-int8-weight-only"
    record = qrun.record("quantize-pt", name)
    assert record["metrics"]["saved"] and "Int8WeightOnlyConfig" in record["path"]
    program = torch.export.load(str(qrun.stage_dir("quantize-pt") / f"{name}.pt2"))
    tensors = [*program.state_dict.values(), *program.constants.values()]
    # torchao keeps the int8 data inside a tensor subclass that reports its logical float dtype
    inner = [
        getattr(t, n) for t in tensors if hasattr(t, "__tensor_flatten__") for n in t.__tensor_flatten__()[0]
    ]
    assert torch.int8 in {t.dtype for t in inner}
    # the graph computes in float: no quantize op on an activation (dynamic int8 has them)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("quantize_per_token" in op or "choose_qparams" in op for op in ops), ops
    logits = program.module()(torch.zeros(3, 1, 28, 28))
    assert logits.dtype == torch.float32 and logits.shape == (3, 10)
    # LeNet-5's weights are mostly in its Linear layers: about 3x smaller, accuracy kept
    assert record["metrics"]["size_ratio"] > 2.0 and abs(record["metrics"]["delta_test_pp"]) < 1.0


def test_from_naming_a_missing_variant_is_a_config_error(tmp_path: Path) -> None:
    text = DATA + "stages:\n  - stage: train\n  - stage: quantize\n    from: [pruned]\n"
    result = run_cli(write_pipeline(tmp_path, text), "--validate", cwd=tmp_path)
    assert result.returncode == 2, result.output
    assert "stages[1] (quantize).from" in result.stderr and "'pruned'" in result.stderr
    assert "Traceback" not in result.output


def test_produced_names_validate_for_later_stages(tmp_path: Path) -> None:
    """In-process ``--validate`` (the CLI's own ``main``): a later ``from:`` may name them."""
    text = (
        DATA
        + """\
stages:
  - stage: train
  - stage: quantize
  - stage: quantize
    name: q-pt
    backend: pytorch
  - stage: quantize
    name: again
    from: [baseline.int8-static, baseline.pt-int8-dynamic]
    modes: [static]
"""
    )
    assert main([str(write_pipeline(tmp_path, text)), "--validate"]) == 0
    cfg = QuantizeConfig.model_validate({"stage": "quantize", "backend": "pytorch", "modes": ["static"]})
    assert cfg.produces(["baseline", "pruned"]) == ["baseline.pt-int8-static", "pruned.pt-int8-static"]


def test_bad_settings_fail_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = {
        "{stage: quantize, name: a, backend: pytorch, per_channel: true}": "per_channel apply only",
        "{stage: quantize, name: b, backend: pytorch, prefer: latency}": "prefer: latency is implemented",
        "{stage: quantize, name: c, calibration: {percentile: 99.9}}": "percentile applies only with method",
        "{stage: quantize, name: d, op_types: [Relu]}": "cannot be dynamically quantized",
        "{stage: quantize, name: e, modes: [static, static]}": "list each mode once",
        "{stage: quantize, name: f, tolerance: -1}": "(f).tolerance",
        "{stage: quantize, name: g, modes: [weight-only]}": "weight-only is torchao's Int8WeightOnlyConfig",
        "{stage: quantize, name: h, backend: pytorch, modes: [fp16]}": "fp16 makes an ONNX file",
        "{stage: quantize, name: i, backend: pytorch, sensitivity: true}": "per-layer analysis",
    }
    text = DATA + "stages:\n  - stage: train\n" + "".join(f"  - {stage}\n" for stage in bad)
    assert main([str(write_pipeline(tmp_path, text)), "--validate"]) == 2
    stderr = capsys.readouterr().err
    for message in bad.values():
        assert message in stderr, (message, stderr)


def test_latency_search_keeps_the_measured_fastest_mix() -> None:
    """Int8 convs that cost time are left in fp32; the last weight layer always stays int8."""
    import time

    def cost_ms(excluded: list[str]) -> float:
        quantized_convs = sum(c not in excluded for c in ("c1", "c2"))
        return 2.0 + 4.0 * quantized_convs + (0.0 if "g1" not in excluded else 6.0)

    def build(excluded: list[str]):
        return lambda: time.sleep(cost_ms(excluded) / 1000)

    excluded, record = quantization.latency_search(
        [],
        {"Conv": ["c1", "c2"], "Gemm": ["g1"]},
        ["c1", "c2", "g1"],
        build,
        parent=lambda: time.sleep(0.006),
        accept=lambda ex: True,
        rounds=3,
        runs=1,
    )
    assert sorted(excluded) == ["c1", "c2"], record
    assert record[0]["chosen"] == "Conv"
    tried = [set(c["fp32_layers"]) for step in record for c in step["candidates"]]
    assert {"c1", "c2", "g1"} not in tried  # never a mix with no int8 weight layer left


def test_accuracy_fallback_excludes_most_sensitive_first() -> None:
    loss = {"a": 0.004, "b": 0.0005, "c": 0.002}  # accuracy each int8 layer costs

    def val_accuracy(excluded: list[str]) -> float:
        return 0.99 - sum(v for k, v in loss.items() if k not in excluded)

    excluded, tries, sensitivity = quantization.accuracy_fallback(["a", "b", "c"], val_accuracy, 0.99, 0.1)
    assert excluded == ["a", "c"]  # 0.05 pp left from 'b' meets 0.1 pp; 'a' alone (0.25 pp) does not
    assert [t.meets for t in tries] == [False, False, True]
    assert [row["layer"] for row in sorted(sensitivity, key=lambda r: -r["recovers_pp"])] == ["a", "c", "b"]


def test_reduce_range_auto_narrows_weights_only_where_int8_clips(tmp_path: Path) -> None:
    """x86 without VNNI clips uint8 x int8 pair sums; VNNI and ARM do not."""
    from compress.measure import int8_saturates

    avx2, vnni = tmp_path / "avx2", tmp_path / "vnni"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    vnni.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni\n")
    assert int8_saturates(avx2, "x86_64")
    assert not int8_saturates(vnni, "x86_64")
    assert not int8_saturates(avx2, "aarch64")
    assert not int8_saturates(tmp_path / "missing", "x86_64")
