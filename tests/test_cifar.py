"""The whole ``pipelines/cifar10.yaml`` (ResNet-20, every stage) through the CLI, end to end.

The real CIFAR-10 is not available here, so a small learnable set is written in the original
python-pickle layout (``compress/benchmarks/cifar_files.py``) and the pipeline file is run unchanged except
for ``--set`` overrides that shrink every stage's budget (images, epochs, batch sizes,
calibration images, benchmark repeats) and loosen only the accuracy thresholds of its gates,
which a one-epoch model cannot meet, and export to the runtimes that read the ONNX file (ONNX,
ORT, OpenVINO; LiteRT and ExecuTorch convert ResNet-20 in ``tests/test_targets.py``).
Everything else -- stage list, architectures, augmentation, schedules, pruning targets,
quantization mode, deploy bundle, report -- is the file users run on a GPU.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from compress.benchmarks.cifar_files import LABEL_NAMES, write_cifar10
from compress.ship.targets import TARGETS
from tests.conftest import REPO, CliResult, run_cli

pytestmark = pytest.mark.slow  # every test reads the one pipeline run

PIPELINE = REPO / "pipelines" / "cifar10.yaml"
CHANCE = 1 / len(LABEL_NAMES)
N_TRAIN, N_TEST = 1500, 500  # generated; the run uses 250 for validation, 1000 to train, 400 to test
TEST_IMAGES = 400
EXPORTED = ["onnx", "ort", "openvino"]

# Budget cuts only: the pipeline's structure and methods stay as written.
SHRINK = [
    "data.val_size=250",
    "data.limit_train=1000",
    f"data.limit_test={TEST_IMAGES}",
    "train.epochs=1",
    "train.batch_size=32",
    "train.warmup_epochs=0",  # one epoch of warm-up would end the run at the peak learning rate
    "slim.steps=1",
    "slim.finetune.epochs=1",
    "slim.finetune.batch_size=32",
    "prune.finetune.epochs=1",
    "prune.finetune.batch_size=32",
    "distill.epochs=1",
    "distill.batch_size=32",
    "distill.warmup_epochs=0",
    "quantize.calibration.images=64",
    "quantize.tolerance=null",  # no per-layer fp32 fallback search on 250 validation images
    "quantize.latency={rounds: 1, runs: 1, batch_size: 8}",
    "export.parity_samples=100",
    # the runtimes that read ONNX; LiteRT and ExecuTorch convert the PyTorch model, and their
    # conversion of this ResNet-20 (residual adds) is checked in tests/test_targets.py, without
    # the ~2 minutes of a pipeline run through them
    f"export.targets=[{', '.join(EXPORTED)}]",
    "benchmark.batch_sizes=[1, 8]",
    "benchmark.warmup=1",
    "benchmark.repeats=5",
    "benchmark.min_seconds=0",
    "benchmark.max_seconds=2",
]


def _pipeline_yaml() -> dict[str, Any]:
    return yaml.safe_load(PIPELINE.read_text(encoding="utf-8"))


def _stage(raw: dict[str, Any], label: str) -> dict[str, Any]:
    return next(s for s in raw["stages"] if (s.get("name") or s["stage"]) == label)


def _gate_overrides(raw: dict[str, Any]) -> list[str]:
    """Accuracy thresholds a 1-epoch model cannot meet, loosened; every other gate kept as written."""
    overrides = []
    for index, rule in enumerate(_stage(raw, "gates")["rules"]):
        if "min_accuracy" in rule:
            overrides.append(f"gates.rules[{index}].min_accuracy=0.15")
        if "max_accuracy_drop" in rule:
            overrides.append(f"gates.rules[{index}].max_accuracy_drop=10")
    return overrides


@dataclass
class CifarRun:
    raw: dict[str, Any]
    result: CliResult
    run_dir: Path
    reports: Path
    manifest: dict[str, Any]
    rows: list[dict[str, Any]]

    def row(self, variant: str, runtime: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["variant"] == variant and r["runtime"] == runtime)


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory: pytest.TempPathFactory) -> CifarRun:
    cwd = tmp_path_factory.mktemp("cifar-run")
    write_cifar10(cwd / "data", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    raw = _pipeline_yaml()
    args: list[str] = [PIPELINE, "--data-root", cwd / "data", "--device", "cpu"]
    for override in SHRINK + _gate_overrides(raw):
        args += ["--set", override]
    result = run_cli(*args, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.output[-4000:]
    assert "Traceback" not in result.output
    run_dir = (cwd / "artifacts" / "cifar10" / "latest").resolve()
    reports = cwd / "reports" / "cifar10"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = json.loads((reports / "results.json").read_text())
    return CifarRun(raw, result, run_dir, reports, manifest, rows)


def test_the_pipeline_runs_every_stage_on_resnet20(cifar_run: CifarRun) -> None:
    raw = cifar_run.raw
    labels = [s.get("name") or s["stage"] for s in raw["stages"]]
    kinds = {s["stage"] for s in raw["stages"]}
    assert {"train", "prune", "distill", "quantize", "export", "benchmark", "gates", "report"} <= kinds
    methods = {s["method"] for s in raw["stages"] if s["stage"] == "prune"}
    assert methods == {"structured", "magnitude"}
    train = _stage(raw, "train")
    assert train["model"]["arch"] == "resnet20" and train["augment"] == "crop_flip"
    assert train["schedule"] in ("cosine", "onecycle")
    assert _stage(raw, "distill")["student"] == {"arch": "resnet20", "width": 0.5}
    assert "static" in _stage(raw, "quantize")["modes"]

    manifest = cifar_run.manifest
    assert [s["name"] for s in manifest["stages"]] == labels
    assert all(s["status"] == "ran" for s in manifest["stages"])
    assert manifest["device"] == "cpu" and manifest["data"]["dataset"] == "cifar10"
    resolved = yaml.safe_load((cifar_run.run_dir / "config.yaml").read_text())
    resolved_train = _stage(resolved, "train")
    assert resolved_train["augment"] == "crop_flip" and resolved_train["model"]["arch"] == "resnet20"
    baseline = manifest["variants"]["baseline"]["metrics"]
    assert baseline["test_count"] == TEST_IMAGES
    assert baseline["parameters"] == 272_474  # He et al.'s ResNet-20: 0.27M parameters


def test_results_hold_every_variant_with_sane_numbers(cifar_run: CifarRun) -> None:
    torch_variants = ["baseline", "slim", "pruned", "student"]
    if _stage(cifar_run.raw, "distill").get("control", True):
        torch_variants.append("student.scratch")
    int8 = [f"{v}.int8-static" for v in _stage(cifar_run.raw, "quantize")["from"]]
    expected = {(v, rt) for v in torch_variants for rt in ("pytorch", "torchscript", "onnxruntime")}
    expected |= {(v, "onnxruntime") for v in int8}
    # every edge target the run exports, for the shipped variants (controls are not shipped);
    # int8 ONNX files only where the runtime reads QDQ ONNX
    assert set(EXPORTED) < set(_stage(cifar_run.raw, "export")["targets"])
    for name in EXPORTED:
        target = TARGETS[name]
        if name == "onnx":
            continue
        expected |= {(v, target.runtime) for v in torch_variants if v != "student.scratch"}
        expected |= {(v, target.runtime) for v in int8 if target.int8}
    assert {(r["variant"], r["runtime"]) for r in cifar_run.rows} == expected
    with open(cifar_run.reports / "results.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert {(r["variant"], r["runtime"]) for r in csv_rows} == expected

    for row in cifar_run.rows:
        where = f"{row['variant']} [{row['runtime']}]"
        if row["status"] == "export_failed" and row["variant"] in int8 and row["runtime"] == "openvino":
            # OpenVINO's own int8 kernels round differently from onnxruntime's; on x86 without
            # VNNI some trained weights put them past 1 % of the largest logit. Such a file is
            # refused with the measured difference, never shipped as if it matched.
            assert row["error"].startswith("parity: "), (where, row["error"])
            continue
        assert row["status"] == "ok", (where, row["error"])
        assert row["test_count"] == TEST_IMAGES, where
        assert 0 <= row["accuracy"] <= 1 and row["correct"] == round(row["accuracy"] * TEST_IMAGES), where
        assert row["size_bytes"] > 10_000 and 0 < row["gzip_bytes"] <= row["size_bytes"] * 1.01, where
        assert row["latency_b1_p50_ms"] > 0 and row["latency_b8_p50_ms"] > 0, where
        assert 0 <= row["sparsity"] < 1, where
        # every variant learnt something from the generated classes
        assert row["accuracy"] > 1.5 * CHANCE, where

    # the same model gives the same answers in each runtime it ships in
    for variant in torch_variants:
        runtimes = ("pytorch", "torchscript", "onnxruntime")
        accuracies = {cifar_run.row(variant, rt)["accuracy"] for rt in runtimes}
        assert max(accuracies) - min(accuracies) <= 1 / TEST_IMAGES + 1e-9, (variant, accuracies)


def test_baseline_beats_chance_on_the_generated_classes(cifar_run: CifarRun) -> None:
    baseline = cifar_run.row("baseline", "pytorch")
    assert baseline["accuracy"] > 3 * CHANCE, baseline["accuracy"]
    assert set(baseline["per_class_accuracy"]) == set(LABEL_NAMES)


def test_compressed_variants_are_what_the_pipeline_promises(cifar_run: CifarRun) -> None:
    baseline = cifar_run.row("baseline", "pytorch")
    slim = cifar_run.row("slim", "pytorch")
    # structured pruning: >= 2x fewer MACs, measured both by the prune stage and by the benchmark
    assert slim["macs"] * 2 <= baseline["macs"], (slim["macs"], baseline["macs"])
    slim_metrics = cifar_run.manifest["variants"]["slim"]["metrics"]
    assert slim_metrics["macs_reduction"] >= 2.0
    assert slim["parameters"] < baseline["parameters"]
    # ... and the fine-tuning after it recovered accuracy (halving a 1-epoch model's MACs costs a lot)
    assert slim_metrics["test_accuracy"] > slim_metrics["test_accuracy_before_finetune"]
    # magnitude pruning: the sparsity asked for, stored as real zeros
    pruned = cifar_run.row("pruned", "pytorch")
    assert pruned["sparsity"] >= _stage(cifar_run.raw, "prune")["amount"] - 0.06
    assert pruned["nonzero_parameters"] < 0.3 * baseline["parameters"]
    assert pruned["gzip_bytes"] < 0.5 * baseline["gzip_bytes"]
    # distillation: a half-width ResNet-20, about 4x fewer parameters and MACs
    student = cifar_run.row("student", "pytorch")
    assert 3.5 < baseline["parameters"] / student["parameters"] < 4.5
    assert 3.5 < baseline["macs"] / student["macs"] < 4.5
    # static int8 ONNX: a much smaller file, nearly the fp32 model's accuracy
    for parent in _stage(cifar_run.raw, "quantize")["from"]:
        fp32 = cifar_run.row(parent, "onnxruntime")
        int8 = cifar_run.row(f"{parent}.int8-static", "onnxruntime")
        assert int8["size_bytes"] < 0.4 * fp32["size_bytes"], parent
        assert abs(int8["accuracy"] - fp32["accuracy"]) <= 0.05, (parent, int8["accuracy"], fp32["accuracy"])
    quantize = json.loads((cifar_run.reports / "quantize.json").read_text())
    assert "static" in json.dumps(quantize)


def test_deploy_bundle_verifies_in_a_fresh_process(cifar_run: CifarRun, tmp_path: Path) -> None:
    deploy = cifar_run.run_dir / "stages" / "export" / "deploy"
    onnx_files = {p.name for p in deploy.glob("*.onnx")}
    shipped = ["baseline", "slim", "pruned", "student", "baseline.int8-static", "slim.int8-static"]
    assert {f"{name}.onnx" for name in shipped} <= onnx_files
    # the from-scratch student is a control: measured and exported, never handed to the edge team
    assert "student.scratch.onnx" not in onnx_files
    if _stage(cifar_run.raw, "distill").get("control", True):
        assert cifar_run.row("student.scratch", "onnxruntime")["status"] == "ok"
    int8_bytes = (deploy / "baseline.int8-static.onnx").stat().st_size
    assert int8_bytes < 0.4 * (deploy / "baseline.onnx").stat().st_size
    meta = json.loads((deploy / "baseline.model.json").read_text())
    assert "0.4914" in json.dumps(meta)  # CIFAR-10's per-channel mean travels with the model
    result = run_cli(deploy, module="compress.verify", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.output
    assert "verify: OK" in result.output


def test_gates_and_report_cover_every_variant(cifar_run: CifarRun) -> None:
    gates = json.loads((cifar_run.reports / "gates.json").read_text())
    names = {rule["name"] for rule in _stage(cifar_run.raw, "gates")["rules"]}
    assert {r["gate"] for r in gates["results"]} == names
    assert gates["failed"] == 0 and gates["passed"] == gates["total"] > 0
    assert (cifar_run.reports / "gates.xml").is_file()

    html = (cifar_run.reports / "latest.html").read_text(encoding="utf-8")
    for variant in {r["variant"] for r in cifar_run.rows}:
        assert variant in html, variant
    summary = (cifar_run.reports / "summary.md").read_text(encoding="utf-8")
    assert "cifar10" in summary and "slim" in summary
