"""The export stage: ONNX + TorchScript per variant, parity, metadata, the deploy bundle.

One CLI run (the tiny baseline, cached from the session fixture, + export + benchmark) is
checked file by file; failure isolation is checked by calling the stage in-process with a
stub context, making the ONNX exporter fail for one variant.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from compress.config import load_pipeline
from compress.context import Context
from compress.errors import ConfigError
from compress.models import build_model, load_model, save_model
from compress.ship import convert, function_table
from compress.ship import variant as variant_export
from compress.stages import config_registry
from compress.stages import export as export_stage
from compress.stages.benchmark import BenchmarkConfig
from compress.stages.benchmark import run as run_benchmark
from compress.stages.export import ExportConfig
from compress.variants import Variant
from tests.conftest import TINY_PIPELINE, run_cli, write_pipeline

EXPORT_AND_BENCHMARK = """\
  - stage: export
    parity_samples: 200
  - stage: benchmark
    batch_sizes: [1, 8]
    warmup: 2
    repeats: 5
    min_seconds: 0.05
"""


@pytest.fixture(scope="module")
def cli_run(tiny_run, data_root, tmp_path_factory):
    """The session's tiny run copied (so its cache is reused) and extended by export + benchmark."""
    cwd = tmp_path_factory.mktemp("export-cli")
    shutil.copytree(tiny_run.cwd / "artifacts", cwd / "artifacts", symlinks=True)
    pipeline = write_pipeline(cwd, TINY_PIPELINE + EXPORT_AND_BENCHMARK)  # same name: 'tiny'
    result = run_cli(pipeline, cwd=cwd, data_root=data_root)
    assert result.returncode == 0, result.output
    run_dir = (cwd / "artifacts" / "tiny" / "latest").resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["cached", "ran", "ran"], manifest["stages"]
    return cwd, run_dir, manifest


def test_bundle_holds_checked_onnx_with_metadata(cli_run):
    cwd, run_dir, manifest = cli_run
    deploy = run_dir / "stages" / "export" / "deploy"
    names = {p.name for p in deploy.iterdir()}
    assert {
        "baseline.onnx",
        "baseline.model.json",
        "baseline.expected.npy",
        "labels.json",
        "sample_input.npy",
        "sample_pixels.npy",
        "sample_labels.npy",
        "bundle.json",
        "README.md",
        "SHA256SUMS",
    } <= names

    proto = onnx.load(str(deploy / "baseline.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    meta = {p.key: p.value for p in proto.metadata_props}
    train_acc = manifest["variants"]["baseline"]["metrics"]["test_accuracy"]
    assert meta["variant"] == "baseline" and meta["pipeline"] == "tiny"
    assert meta["run_id"] == run_dir.name and meta["compress_version"]
    assert float(meta["test_accuracy"]) == pytest.approx(train_acc)
    assert json.loads(meta["input_shape"]) == ["batch", 1, 28, 28]
    assert json.loads(meta["preprocessing"])["mean"] == [0.1307]
    assert json.loads(meta["labels"])[3] == "3 - three"

    info = json.loads((deploy / "baseline.model.json").read_text())
    assert info["variant"] == "baseline" and info["labels"] == json.loads(meta["labels"])
    assert info["parity"]["ok"] and info["parity"]["max_abs_diff"] <= 1e-4
    assert info["parity"]["top1_agreement"] == 1.0 and info["parity"]["samples"] == 200

    # the recorded sums are the files' real sums
    lines = (deploy / "SHA256SUMS").read_text().splitlines()
    assert len(lines) == len(names) - 1
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=deploy, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_exported_files_match_pytorch(cli_run):
    """TorchScript loads with torch.jit.load alone; ONNX and TorchScript logits match eager."""
    _cwd, run_dir, _ = cli_run
    export_dir = run_dir / "stages" / "export"
    model, _ = load_model(run_dir / "stages" / "train" / "model.pt")
    x = torch.from_numpy(np.load(export_dir / "deploy" / "sample_input.npy"))
    with torch.no_grad():
        eager = model.eval()(x).numpy()
    extra = {"model.json": ""}
    scripted = torch.jit.load(str(export_dir / "torchscript" / "baseline.pt"), _extra_files=extra)
    assert json.loads(extra["model.json"])["variant"] == "baseline"
    with torch.no_grad():
        assert np.abs(scripted(x).numpy() - eager).max() <= 1e-4
    expected = np.load(export_dir / "deploy" / "baseline.expected.npy")
    assert np.abs(expected - eager).max() <= 1e-4
    assert (expected.argmax(1) == eager.argmax(1)).all()


def test_verify_passes_in_a_fresh_process(cli_run, data_root):
    cwd, run_dir, _ = cli_run
    deploy = run_dir / "stages" / "export" / "deploy"
    result = run_cli(deploy, cwd=cwd, module="compress.verify")
    assert result.returncode == 0, result.output
    assert "verify: OK" in result.stdout
    assert "baseline.onnx" in result.stdout and "16/16" in result.stdout


def test_readme_snippet_runs_with_numpy_and_onnxruntime_only(cli_run):
    _cwd, run_dir, _ = cli_run
    deploy = run_dir / "stages" / "export" / "deploy"
    readme = (deploy / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 15
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imported <= {"json", "numpy", "onnxruntime"}
    assert "| `baseline.onnx` |" in readme and "results.csv" in readme
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=deploy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    labels = json.loads((deploy / "labels.json").read_text())
    expected = np.load(deploy / "baseline.expected.npy").argmax(1)
    assert proc.stdout.strip() == str([labels[i] for i in expected])


def test_benchmark_rows_come_from_the_exported_files(cli_run):
    cwd, run_dir, manifest = cli_run
    table = pd.read_csv(cwd / "reports" / "tiny" / "results.csv")
    assert list(table["runtime"]) == ["pytorch", "torchscript", "onnxruntime"]
    assert (table["status"] == "ok").all()
    train_acc = manifest["variants"]["baseline"]["metrics"]["test_accuracy"]
    assert table["accuracy"].tolist() == pytest.approx([train_acc] * 3)
    assert table["top1_agreement_pytorch"].tolist() == [1.0, 1.0, 1.0]
    onnx_row = table.set_index("runtime").loc["onnxruntime"]
    onnx_file = run_dir / "stages" / "export" / "deploy" / "baseline.onnx"
    assert onnx_row["size_bytes"] == onnx_file.stat().st_size
    assert bool(onnx_row["export_ok"]) and onnx_row["parity_max_abs_diff"] <= 1e-4
    assert (run_dir.parent / onnx_row["file"]).resolve() == onnx_file.resolve()
    bench = next(s for s in manifest["stages"] if s["stage"] == "benchmark")
    assert bench["metrics"]["rows"] == 3 and "baseline@onnxruntime" in bench["metrics"]


# ---------------------------------------------------------------- in-process: failure isolation


def make_context(tmp_path: Path, data_root: Path) -> Context:
    text = TINY_PIPELINE.replace("limit_test: 1000", "limit_test: 300")
    pipeline = load_pipeline(write_pipeline(tmp_path, text, name="stub"), config_registry())
    return Context(pipeline, "test-run", tmp_path / "run", torch.device("cpu"), data_root, "test")


def torch_variant(tmp_path: Path, name: str, width: float, accuracy: float = 0.5) -> Variant:
    torch.manual_seed(0)
    spec = {"arch": "lenet5", "width": width, "in_channels": 1, "image_size": 28, "num_classes": 10}
    path = tmp_path / "models" / f"{name}.pt"
    save_model(build_model(spec), spec, path)
    return Variant(name, "torch", path, stage="train", metrics={"test_accuracy": accuracy})


def onnx_int8_variant(tmp_path: Path, parent: Variant) -> Variant:
    """What the quantize stage makes: an onnxruntime dynamically quantized ONNX file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, _ = parent.load_torch()
    fp32 = tmp_path / "models" / "fp32.onnx"
    convert.export_onnx(model, torch.randn(2, 1, 28, 28), fp32)
    proto = onnx.load(str(fp32))
    del proto.graph.value_info[:]  # the quantizer re-infers shapes itself
    onnx.save(proto, str(fp32))
    path = tmp_path / "models" / "int8.onnx"
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    return Variant(f"{parent.name}.int8-dynamic", "onnx", path, stage="quantize", parent=parent.name)


def test_failed_export_is_recorded_and_the_others_still_ship(tmp_path, data_root, monkeypatch):
    ctx = make_context(tmp_path, data_root)
    good = torch_variant(tmp_path, "good", 0.5)
    broken = torch_variant(tmp_path, "broken", 0.25)
    int8 = onnx_int8_variant(tmp_path, good)
    ctx.variants = {v.name: v for v in (good, broken, int8)}
    real_export = variant_export.export_onnx

    def export_or_refuse(model, sample, path, **kwargs):
        if Path(path).name.startswith("broken"):
            raise RuntimeError("Unsupported operator 'aten::fancy_op' (simulated exporter rejection)")
        return real_export(model, sample, path, **kwargs)

    monkeypatch.setattr(variant_export, "export_onnx", export_or_refuse)
    cfg = ExportConfig.model_validate({"stage": "export", "parity_samples": 64, "sample_count": 8})
    out = tmp_path / "export"
    result = export_stage.run(cfg, [good, broken, int8], ctx, out)

    reports = result.metrics["variants"]
    assert reports["broken"]["files"]["onnx"]["ok"] is False
    assert "aten::fancy_op" in reports["broken"]["files"]["onnx"]["error"]
    assert reports["broken"]["files"]["torchscript"]["ok"] is True  # only ONNX was refused
    assert reports["good"]["files"]["onnx"]["ok"] and reports["good"]["files"]["torchscript"]["ok"]
    int8_entry = reports["good.int8-dynamic"]["files"]["onnx"]
    assert int8_entry["ok"] and int8_entry["max_abs_diff"] == 0.0  # the copy computes what its source did
    assert int8_entry["parent"] == "good" and 0 < int8_entry["parent_max_abs_diff"] < 1.0
    assert result.metrics["failed"] == 1 and result.metrics["exported"] == 4
    assert result.metrics["broken.onnx"].startswith("FAILED")

    deploy = out / "deploy"
    assert (deploy / "good.onnx").is_file() and (deploy / "good.int8-dynamic.onnx").is_file()
    assert not (deploy / "broken.onnx").exists()
    assert "onnx" not in result.artifacts["broken"] and "torchscript" in result.artifacts["broken"]
    index = json.loads((deploy / "bundle.json").read_text())
    assert [m["variant"] for m in index["models"]] == ["good", "good.int8-dynamic"]
    assert [m["quantized"] for m in index["models"]] == [False, True]
    meta = {p.key: p.value for p in onnx.load(str(deploy / "good.int8-dynamic.onnx")).metadata_props}
    assert meta["variant"] == "good.int8-dynamic" and meta["parent"] == "good"

    from compress.verify import verify

    code, rows, _ = verify(deploy)
    assert code == 0, rows

    # the benchmark reports the failed export as a row instead of silently dropping it
    ctx.artifacts = result.artifacts
    bench_cfg = BenchmarkConfig.model_validate(
        {
            "stage": "benchmark",
            "runtimes": ["onnxruntime"],
            "batch_sizes": [1],
            "warmup": 1,
            "repeats": 5,
            "min_seconds": 0,
            "baseline": "good",
        }
    )
    bench = run_benchmark(bench_cfg, [good, broken, int8], ctx, tmp_path / "bench")
    table = pd.read_json(tmp_path / "bench" / "results.json").set_index("variant")
    assert table.loc["broken", "status"] == "export_failed"
    assert not table.loc["broken", "export_ok"] and "aten::fancy_op" in table.loc["broken", "error"]
    assert table.loc["good", "status"] == "ok" and table.loc["good.int8-dynamic", "status"] == "ok"
    assert table.loc["good.int8-dynamic", "counts_from"] == "parent:good"
    assert table.loc["good.int8-dynamic", "parameters"] == table.loc["good", "parameters"]
    assert table.loc["good.int8-dynamic", "size_ratio"] < 0.5  # int8 weights: about a quarter
    assert bench.metrics["failed_rows"] == 1


def test_parity_failure_marks_the_export_failed_with_numbers(tmp_path, data_root, monkeypatch):
    ctx = make_context(tmp_path, data_root)
    variant = torch_variant(tmp_path, "drifted", 0.25)
    real_export = variant_export.export_onnx

    def export_a_different_model(model, sample, path, **kwargs):
        with torch.no_grad():
            model.classifier.bias += 0.01  # the file no longer computes what the variant does
        try:
            return real_export(model, sample, path, **kwargs)
        finally:
            with torch.no_grad():
                model.classifier.bias -= 0.01

    monkeypatch.setattr(variant_export, "export_onnx", export_a_different_model)
    cfg = ExportConfig.model_validate({"stage": "export", "parity_samples": 32, "formats": ["onnx"]})
    result = export_stage.run(cfg, [variant], ctx, tmp_path / "export")
    entry = result.metrics["variants"]["drifted"]["files"]["onnx"]
    assert entry["ok"] is False and "parity" in entry["error"]
    assert entry["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    assert entry["kept_as"] == "failed/drifted.onnx" and (tmp_path / "export" / entry["kept_as"]).is_file()
    assert not (tmp_path / "export" / "deploy" / "drifted.onnx").exists()
    assert json.loads((tmp_path / "export" / "deploy" / "bundle.json").read_text())["models"] == []


def test_export_config_is_checked_before_anything_runs(tmp_path):
    bad = TINY_PIPELINE + "  - stage: export\n    opset: 13\n    formats: []\n    from: nope\n"
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write_pipeline(tmp_path, bad), config_registry())
    message = str(caught.value)
    assert "stages[1] (export).opset" in message and "stages[1] (export).formats" in message


def test_a_model_exported_twice_is_converted_once_and_a_changed_one_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quantizer and the export stage both export a parent: one conversion, two files with
    their own metadata; new weights, a new input shape or a hook (whose effect the key cannot
    see) convert again. The exporter's ATen -> ONNX function table is built once for all of them,
    and torch's own builder is back in place after each."""
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    torch_builder = ONNXRegistry.__dict__["from_torchlib"]
    spec = {"arch": "lenet5", "width": 0.5, "in_channels": 1, "num_classes": 10, "image_size": 28}
    torch.manual_seed(0)
    model, x = build_model(spec).eval(), torch.randn(2, 1, 28, 28)
    calls = []
    real = convert._export_proto
    monkeypatch.setattr(convert, "_export_proto", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(convert, "_EXPORTED", OrderedDict())
    monkeypatch.setattr(function_table, "_TABLES", {})

    def run(path: Path) -> np.ndarray:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x.numpy()})[0]

    convert.export_onnx(model, x, tmp_path / "a.onnx", metadata={"variant": "a"})
    convert.export_onnx(model, torch.randn(5, 1, 28, 28), tmp_path / "b.onnx", metadata={"variant": "b"})
    assert len(calls) == 1
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "b.onnx")).metadata_props}
    assert meta["variant"] == "b"
    np.testing.assert_array_equal(run(tmp_path / "a.onnx"), run(tmp_path / "b.onnx"))

    with torch.no_grad():
        next(model.parameters()).mul_(2)
        expected = model(x).numpy()
    convert.export_onnx(model, x, tmp_path / "c.onnx")
    assert len(calls) == 2
    np.testing.assert_allclose(run(tmp_path / "c.onnx"), expected, atol=1e-5)

    model.register_forward_hook(lambda module, inputs, output: output * 0)
    convert.export_onnx(model, x, tmp_path / "d.onnx")
    convert.export_onnx(model, x, tmp_path / "e.onnx")
    assert len(calls) == 4
    assert not run(tmp_path / "e.onnx").any()
    assert function_table.tables_built() == 1
    assert ONNXRegistry.__dict__["from_torchlib"] is torch_builder


def test_in_place_activations_export_out_of_place_and_get_their_flags_back(tmp_path: Path) -> None:
    """The exporter sees out-of-place activations (its decomposition of in-place ones doubled
    MobileNetV3's export time); the model keeps its flags, and the file computes the same."""
    import onnxruntime as ort

    torch.manual_seed(0)
    act = torch.nn.Hardswish(inplace=True)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 4, 3), act,
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3),
    ).eval()  # fmt: skip
    seen = []
    act.register_forward_pre_hook(lambda module, inputs: seen.append(module.inplace))
    x = torch.randn(2, 1, 8, 8)
    convert.export_onnx(model, x[:1], tmp_path / "m.onnx")
    assert seen and not any(seen)
    assert model[1].inplace and act.inplace
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-5)


def test_a_function_table_built_before_an_operator_library_loaded_is_built_again() -> None:
    """torchlib's functions for operators not yet registered are left out of a table (a QAT
    model's ``quantized_decomposed`` ops, registered when torchao's quantizer is imported, failed
    to export with a table built before): new operators where torchlib has functions mean a new
    table; elsewhere they do not."""
    function_table.prepare(convert.DEFAULT_OPSET)
    tables = function_table.tables_built()
    function_table.prepare(convert.DEFAULT_OPSET)
    elsewhere = torch.library.Library(f"compress_test_{uuid.uuid4().hex[:8]}", "DEF")
    elsewhere.define("twice(Tensor x) -> Tensor")
    function_table.prepare(convert.DEFAULT_OPSET)
    assert function_table.tables_built() == tables
    prims = torch.library.Library("prims", "FRAGMENT")
    prims.define(f"compress_test_{uuid.uuid4().hex[:8]}(Tensor x) -> Tensor")
    function_table.prepare(convert.DEFAULT_OPSET)
    assert function_table.tables_built() == tables + 1
