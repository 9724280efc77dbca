"""``python -m compress.verify``: checksums, then each model in a numpy+onnxruntime-only process.

The bundle is made once by the export stage (in-process, an untrained LeNet-5 is enough:
verify checks that files reproduce what was recorded, not that the model is good); every
test damages its own copy.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.config import load_pipeline
from compress.context import Context
from compress.models import build_model, save_model
from compress.ship import verify
from compress.ship.targets import TARGETS, child
from compress.stages import config_registry
from compress.stages import export as export_stage
from compress.variants import Variant
from tests.conftest import TINY_PIPELINE, run_cli, write_pipeline


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, data_root) -> Path:
    root = tmp_path_factory.mktemp("verify")
    text = TINY_PIPELINE.replace("limit_test: 1000", "limit_test: 100")
    pipeline = load_pipeline(write_pipeline(root, text), config_registry())
    ctx = Context(pipeline, "test-run", root / "run", torch.device("cpu"), data_root, "test")
    spec = {"arch": "lenet5", "width": 0.25, "in_channels": 1, "image_size": 28, "num_classes": 10}
    torch.manual_seed(0)
    save_model(build_model(spec), spec, root / "model.pt")
    variant = Variant("baseline", "torch", root / "model.pt", stage="train", metrics={"test_accuracy": 0.1})
    cfg = export_stage.ExportConfig.model_validate(
        {"stage": "export", "formats": ["onnx"], "parity_samples": 32, "sample_count": 8}
    )
    export_stage.run(cfg, [variant], ctx, root / "export")
    return root / "export" / "deploy"


@pytest.fixture
def bundle(bundle_dir, tmp_path) -> Path:
    copy = tmp_path / "deploy"
    shutil.copytree(bundle_dir, copy)
    return copy


def reseal(directory: Path) -> None:
    """Rewrite SHA256SUMS after a change, as someone re-packing the bundle by hand would."""
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != "SHA256SUMS"
    ]
    (directory / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_intact_bundle_passes(bundle):
    result = run_cli(bundle, cwd=bundle.parent, module="compress.verify")
    assert result.returncode == 0, result.output
    assert "baseline.onnx" in result.stdout and "8/8" in result.stdout
    assert "verify: OK" in result.stdout


def test_one_tampered_byte_fails_naming_the_file(bundle):
    path = bundle / "baseline.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, deep inside the weights
    path.write_bytes(bytes(data))
    result = run_cli(bundle, cwd=bundle.parent, module="compress.verify")
    assert result.returncode == 1, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("baseline.onnx"))
    assert "MISMATCH" in row
    assert "FAILED: baseline.onnx" in result.stderr
    assert "Traceback" not in result.output


def test_truncated_model_fails(bundle):
    path = bundle / "baseline.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    code, rows, _ = verify.verify(bundle)
    row = next(r for r in rows if r.file == "baseline.onnx")
    assert code == 1 and row.checksum == "MISMATCH" and row.outputs == "NOT LOADABLE"


def test_tampered_sample_input_fails(bundle):
    """A changed data file is caught by its checksum even though no model file changed."""
    np.save(bundle / "sample_input.npy", np.load(bundle / "sample_input.npy") + 1)
    code, rows, _ = verify.verify(bundle)
    bad = {r.file for r in rows if not r.ok}
    assert code == 1 and "sample_input.npy" in bad and "baseline.onnx" in bad  # outputs differ too


def test_wrong_expected_outputs_fail_even_with_matching_checksums(bundle):
    """The run really compares outputs: a resealed bundle with altered expectations fails."""
    expected = np.load(bundle / "baseline.expected.npy")
    expected[0, 0] += 1e-3
    np.save(bundle / "baseline.expected.npy", expected)
    reseal(bundle)
    code, rows, _ = verify.verify(bundle)
    row = next(r for r in rows if r.file == "baseline.onnx")
    assert code == 1 and row.checksum == "ok" and row.outputs == "MISMATCH"
    assert row.max_abs_diff == pytest.approx(1e-3, rel=1e-2)


def test_not_a_bundle_and_not_onnx_exit_2_without_traceback(bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(empty, cwd=tmp_path, module="compress.verify")
    assert result.returncode == 2 and "not a deploy bundle" in result.stderr
    assert "Traceback" not in result.output

    result = run_cli(bundle / "baseline.onnx", cwd=tmp_path, module="compress.verify")
    assert result.returncode == 2 and "is a file" in result.stderr

    (bundle / "baseline.onnx").write_text("this is not an ONNX model\n")
    reseal(bundle)
    result = run_cli(bundle, cwd=tmp_path, module="compress.verify")
    assert result.returncode == 2, result.output
    assert "baseline.onnx: not a model ONNX (onnxruntime) can load" in result.stderr
    assert "Traceback" not in result.output


def test_child_imports_only_numpy_and_onnxruntime(bundle):
    tree = ast.parse(child.program(TARGETS["onnx"]))
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import)]
    imported = {alias.name.split(".")[0] for node in imports for alias in node.names}
    assert imported == {"importlib", "sys", "json", "numpy", "onnxruntime"}
    assert not any(isinstance(node, ast.ImportFrom) for node in ast.walk(tree))

    index = json.loads((bundle / "bundle.json").read_text())
    model = index["models"][0]
    result = child.compare(
        TARGETS["onnx"], bundle / model["file"], bundle / "sample_input.npy", bundle / model["expected"]
    )
    assert result["ok"] and result["top1_same"] == result["count"] == 8, result
    assert result["max_abs_diff"] <= model["atol"]
    assert "numpy" in result["modules"] and "onnxruntime" in result["modules"]
    assert not {"torch", "compress", "onnx", "torchvision"} & set(result["modules"])


def test_child_refuses_torch_even_when_installed(tmp_path):
    """The import hook makes a hidden torch dependency fail instead of passing by luck."""
    prefix = child.program(TARGETS["onnx"]).split("import numpy", 1)[0]
    code = prefix + "import torch\n"
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "may not import torch" in proc.stderr
