"""Edge targets: one bundle for onnxruntime (.onnx, .ort), OpenVINO, LiteRT and ExecuTorch.

One tiny LeNet-5 pipeline through the CLI (train, static int8, export to every installed
target, benchmark), then: every fp32 file ships and ``compress.verify`` passes in each
runtime's own clean process; int8 ships where the runtime reads QDQ ONNX and is refused with
the reason elsewhere; the benchmark times each runtime; tampered files are caught; a target
forced below the parity threshold is not shipped; config mistakes are one clear message.
A target whose extra is not installed is skipped with the pip command as the reason.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.config import load_pipeline
from compress.errors import ConfigError
from compress.ship.targets import TARGETS, missing_packages
from compress.ship.targets.registry import install_hint
from compress.stages import config_registry
from compress.stages import export as export_stage
from tests.conftest import TINY_PIPELINE, CliResult, run_cli, write_pipeline

EDGE = [name for name in TARGETS if name != "onnx"]
INSTALLED = [name for name in TARGETS if not missing_packages(TARGETS[name])]
SUFFIX = {name: TARGETS[name].suffix for name in TARGETS}

PIPELINE = (
    TINY_PIPELINE.replace("limit_test: 1000", "limit_test: 500")
    + """\
  - stage: quantize
    from: [baseline]
    modes: [static, fp16]
    calibration: {images: 128}
    tolerance: 1.0
    latency: {rounds: 2, runs: 1}
  - stage: export
    formats: [onnx]
    parity_samples: 200
    sample_count: 8
    targets: TARGETS_HERE
  - stage: benchmark
    batch_sizes: [1, 8]
    warmup: 2
    repeats: 5
    min_seconds: 0
    max_seconds: 2
""".replace("TARGETS_HERE", json.dumps(INSTALLED))
)


def needs(target: str) -> None:
    """Skip, with the install command as the reason, when the target's extra is absent."""
    missing = missing_packages(TARGETS[target])
    if missing:
        pytest.skip(f"{target}: {', '.join(missing)} not installed ({install_hint(TARGETS[target])})")


class EdgeRun:
    def __init__(self, cwd: Path, result: CliResult) -> None:
        self.cwd, self.result = cwd, result
        self.run_dir = (cwd / "artifacts" / "edge" / "latest").resolve()
        self.export = self.run_dir / "stages" / "export"
        self.deploy = self.export / "deploy"
        self.index = json.loads((self.deploy / "bundle.json").read_text())
        self.rows = json.loads((cwd / "reports" / "edge" / "results.json").read_text())

    def entry(self, variant: str, target: str) -> dict[str, Any] | None:
        models = self.index["models"]
        return next((m for m in models if m["variant"] == variant and m["target"] == target), None)

    def report(self, variant: str) -> dict[str, Any]:
        return json.loads((self.export / "exports" / f"{variant}.json").read_text())

    def row(self, variant: str, runtime: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["variant"] == variant and r["runtime"] == runtime), None)


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> EdgeRun:
    cwd = tmp_path_factory.mktemp("edge")
    pipeline = write_pipeline(cwd, PIPELINE, name="edge")
    result = run_cli(pipeline, cwd=cwd, data_root=data_root, timeout=900)
    assert result.returncode == 0, result.output[-4000:]
    assert "Traceback" not in result.output
    return EdgeRun(cwd, result)


@pytest.mark.slow
@pytest.mark.parametrize("target", EDGE)
def test_fp32_ships_for_each_target_and_matches_pytorch(edge_run: EdgeRun, target: str) -> None:
    needs(target)
    entry = edge_run.entry("baseline", target)
    assert entry is not None, edge_run.report("baseline").get("targets", {}).get(target)
    assert entry["file"] == f"baseline{SUFFIX[target]}" and entry["runtime"] == TARGETS[target].runtime
    for name in entry["files"]:
        assert (edge_run.deploy / name).is_file()
    parity = edge_run.report("baseline")["targets"][target]
    assert parity["ok"] and parity["samples"] == 200
    assert parity["top1_agreement"] >= 0.999 and parity["max_abs_diff"] <= 1e-4
    assert parity["runtime_version"].startswith(TARGETS[target].runtime)


@pytest.mark.slow
def test_verify_runs_each_file_in_its_own_runtime(edge_run: EdgeRun, tmp_path: Path) -> None:
    copy = tmp_path / "deploy"
    shutil.copytree(edge_run.deploy, copy)
    result = run_cli(copy, cwd=tmp_path, module="compress.verify")
    assert result.returncode == 0, result.output
    checked = [line.split()[0] for line in result.stdout.splitlines() if "  ok        ok" in line]
    expected = {f"baseline{SUFFIX[t]}" for t in INSTALLED}
    for reduced in ("baseline.int8-static", "baseline.fp16"):
        expected |= {f"{reduced}{SUFFIX[t]}" for t in INSTALLED if TARGETS[t].int8}
    assert set(checked) == expected, result.stdout
    if "ort" in INSTALLED:
        config = (copy / "required_operators.config").read_text()
        assert "ai.onnx" in config and "Conv" in config  # what a reduced ORT Mobile build needs
    only = run_cli(copy, "--targets", "onnx", cwd=tmp_path, module="compress.verify")
    assert only.returncode == 0 and "SKIPPED" in only.stdout


SNIPPET_IMPORTS = {
    "ort": {"onnxruntime"},
    "openvino": {"openvino"},
    "tflite": {"ai_edge_litert"},
    "executorch": {"executorch", "torch"},  # its Python binding takes torch tensors
}


@pytest.mark.slow
@pytest.mark.parametrize("target", EDGE)
def test_the_readme_snippet_for_each_runtime_runs_alone(edge_run: EdgeRun, target: str) -> None:
    needs(target)
    readme = (edge_run.deploy / "README.md").read_text()
    section = readme.split(f"## Run it in {TARGETS[target].label}\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 15, code
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imported <= {"json", "numpy"} | SNIPPET_IMPORTS[target], imported
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=edge_run.deploy, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = json.loads((edge_run.deploy / "labels.json").read_text())
    expected = np.load(edge_run.deploy / "baseline.reference.npy").argmax(1)
    assert proc.stdout.strip().splitlines()[-1] == str([labels[i] for i in expected])


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort", "openvino", "tflite", "executorch"])
def test_int8_ships_where_the_runtime_reads_qdq_onnx(edge_run: EdgeRun, target: str) -> None:
    needs(target)
    parity = edge_run.report("baseline.int8-static")["targets"][target]
    entry = edge_run.entry("baseline.int8-static", target)
    if TARGETS[target].int8:
        assert entry is not None and entry["quantized"], parity
        assert parity["ok"] and parity["top1_agreement"] >= 0.999
        assert edge_run.row("baseline.int8-static", TARGETS[target].runtime)["status"] == "ok"
    else:
        assert entry is None and not parity["ok"]
        assert "fp32" in parity["skipped"]
        assert edge_run.row("baseline.int8-static", TARGETS[target].runtime) is None


@pytest.mark.slow
@pytest.mark.parametrize("target", EDGE)
def test_benchmark_times_each_runtime_on_the_same_inputs(edge_run: EdgeRun, target: str) -> None:
    needs(target)
    row = edge_run.row("baseline", TARGETS[target].runtime)
    pytorch = edge_run.row("baseline", "pytorch")
    assert row is not None and row["status"] == "ok", row
    assert row["top1_agreement_pytorch"] >= 0.999
    assert abs(row["accuracy"] - pytorch["accuracy"]) <= 0.002 and row["test_count"] == 500
    assert row["latency_b1_p50_ms"] > 0 and row["latency_b8_p50_ms"] > 0
    assert row["runtime_version"].split()[0] == TARGETS[target].runner
    files = edge_run.entry("baseline", target)["files"]
    assert row["size_bytes"] == sum((edge_run.deploy / f).stat().st_size for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("target", EDGE)
def test_a_tampered_target_file_is_caught(edge_run: EdgeRun, tmp_path: Path, target: str) -> None:
    needs(target)
    copy = tmp_path / "deploy"
    shutil.copytree(edge_run.deploy, copy)
    path = copy / f"baseline{SUFFIX[target]}"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    # this runtime's files only (test_verify_runs_each_file_in_its_own_runtime checks them all)
    result = run_cli(copy, "--targets", target, cwd=tmp_path, module="compress.verify")
    assert result.returncode == 1, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith(path.name))
    assert "MISMATCH" in row and path.name in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_target_below_the_parity_threshold_is_not_shipped(
    edge_run: EdgeRun, tmp_path: Path, data_root: Path
) -> None:
    target = next((t for t in ("openvino", "ort", "tflite", "executorch") if t in INSTALLED), None)
    if target is None:
        pytest.skip("no edge target installed (pip install -e '.[edge]')")
    cwd = tmp_path / "run"
    shutil.copytree(edge_run.cwd, cwd, symlinks=True)
    env = {"COMPRESS_FAULT": f"parity:baseline:{target}@corrupt"}
    only = ["--set", f"export.targets=[onnx, {target}]"]  # the other targets' conversions are not in question
    result = run_cli(cwd / "edge.yaml", "--from", "export", *only, cwd=cwd, data_root=data_root, env=env)
    assert result.returncode == 0, result.output[-3000:]
    export = (cwd / "artifacts" / "edge" / "latest" / "stages" / "export").resolve()
    report = json.loads((export / "exports" / "baseline.json").read_text())["targets"][target]
    assert not report["ok"] and "parity" in report["error"]
    assert report["kept_as"] and (export / report["kept_as"][0]).is_file()
    index = json.loads((export / "deploy" / "bundle.json").read_text())
    shipped = {(m["variant"], m["target"]) for m in index["models"]}
    assert ("baseline", target) not in shipped and ("baseline", "onnx") in shipped
    assert not (export / "deploy" / f"baseline{SUFFIX[target]}").exists()
    log = (cwd / "artifacts" / "edge" / "latest" / "run.log").read_text()
    assert f"baseline {target}: FAILED: parity" in log


def test_an_unknown_target_is_a_config_error_with_a_suggestion(tmp_path: Path) -> None:
    text = TINY_PIPELINE + "  - stage: export\n    targets: [onnx, openvno]\n"
    result = run_cli(write_pipeline(tmp_path, text), "--validate", cwd=tmp_path)
    assert result.returncode == 2
    assert "stages[1] (export).targets" in result.stderr and "did you mean 'openvino'?" in result.stderr
    assert "Traceback" not in result.output


def test_an_absent_runtime_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absent = lambda target: list(target.packages) if target.name == "executorch" else []  # noqa: E731
    monkeypatch.setattr(export_stage, "missing_packages", absent)
    text = TINY_PIPELINE + "  - stage: export\n    targets: [onnx, executorch]\n"
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write_pipeline(tmp_path, text), config_registry())
    message = str(caught.value)
    assert "targets" in message and "pip install -e '.[executorch]'" in message


@pytest.mark.slow
def test_fp16_variant_halves_the_file_and_ships_where_onnx_is_read(edge_run: EdgeRun) -> None:
    """quantize modes: [fp16] -> baseline.fp16: fp16 weights, fp32 I/O, parity vs its fp32 parent."""
    quantize = json.loads((edge_run.run_dir / "stages" / "quantize" / "quantize.json").read_text())
    record = quantize["variants"]["baseline.fp16"]
    metrics = record["metrics"]
    assert metrics["fp16_initializers"] > 0 and metrics["float_initializers"] == 0
    assert metrics["int8_initializers"] == 0 and 1.8 < metrics["size_ratio"] < 2.1
    assert abs(metrics["delta_test_pp"]) <= 0.5 and "float16" in record["path"]
    onnx_row, parent = edge_run.row("baseline.fp16", "onnxruntime"), edge_run.row("baseline", "onnxruntime")
    assert onnx_row["status"] == "ok" and onnx_row["top1_agreement_pytorch"] >= 0.99
    assert 1.8 < parent["size_bytes"] / onnx_row["size_bytes"] < 2.1
    for target in EDGE:
        if target not in INSTALLED:
            continue
        parity = edge_run.report("baseline.fp16")["targets"][target]
        if TARGETS[target].int8:  # the runtimes that read an ONNX file take its fp16 weights too
            assert parity["ok"] and parity["top1_agreement"] >= 0.999, parity
        else:
            assert not parity["ok"] and "ONNX-only" in parity["skipped"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ("tflite", "executorch") if n in INSTALLED])
def test_a_residual_network_converts_from_pytorch_and_matches_it(name: str, tmp_path: Path) -> None:
    """The PyTorch-converted runtimes on ResNet-20 (residual adds, batch norm, global pooling),
    the architecture ``pipelines/cifar10.yaml`` ships; the other runtimes read its ONNX file,
    which ``tests/test_cifar.py`` exports."""
    import torch

    from compress.models.builders import build_model
    from compress.models.zoo import ModelSpec
    from compress.ship.edge import converter
    from compress.ship.targets.runners import runner
    from compress.ship.targets.source import Source

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet20", width=0.5, in_channels=3, image_size=32, num_classes=10))
    model.eval()
    example = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(example).numpy()
    source = Source(name, "resnet20", None, model, example, False, False, reference)
    target = TARGETS[name]
    files = converter(name).convert(source, tmp_path)
    run = runner(target.runner).load(next(f for f in files if f.suffix == target.suffix))
    outputs = np.concatenate([run(example[i : i + 1].numpy()) for i in range(len(example))])
    assert np.abs(outputs - reference).max() < 1e-4
    assert (outputs.argmax(1) == reference.argmax(1)).all()


def test_a_flip_between_logits_tied_at_the_tolerance_is_not_a_parity_failure():
    """Two correct int8 kernels may pick either class where the source's top two logits are
    within twice the tolerance; a flip on any other image still counts against the file."""
    from compress.ship.edge import _decided_agreement

    reference = np.array([[5.0, 1.0, 0.0], [1.0, 1.04, 0.0], [0.0, 3.0, 1.0]])
    assert _decided_agreement(reference, [0, 0, 1], atol=0.05) == (1.0, 1)  # image 1 is a tie
    assert _decided_agreement(reference, [0, 1, 1], atol=0.01) == (1.0, 0)  # no tie at 0.01
    assert _decided_agreement(reference, [0, 0, 1], atol=0.01) == (pytest.approx(2 / 3), 0)
    assert _decided_agreement(reference, [2, 1, 1], atol=0.05) == (0.5, 1)
