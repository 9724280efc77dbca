"""Every pipeline shipped under ``pipelines/`` runs end to end, so none can break unnoticed.

Each file is run through the CLI as a user would, unchanged except for ``--set`` budget cuts
derived from its own stages (images, epochs, trials, seeds, calibration images, timing repeats,
the parents a latency search walks; edge targets cut to ONNX, which ``tests/test_targets.py``
covers for every runtime) and accuracy gates loosened to what a one-epoch model can meet.
Datasets not present here are written in their real on-disk format: Fashion-MNIST as full-size
idx files of MNIST's images under another class mapping (so the weights pruned are unlike
MNIST's), an image folder as PNGs of real MNIST digits. Two pipelines run elsewhere in full:
``cifar10.yaml`` in ``tests/test_cifar.py`` and ``ci-smoke.yaml`` in ``.ci/run`` (with its
regression check); the walk asserts that they still do, so a new file under ``pipelines/`` is
run here by default.
"""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, CliResult, finish_cli, start_cli

PIPELINES = sorted(p.name for p in (REPO / "pipelines").glob("*.yaml"))
RUN_ELSEWHERE = {
    "cifar10.yaml": lambda: __import__("tests.test_cifar", fromlist=["PIPELINE"]).PIPELINE.name,
    "ci-smoke.yaml": lambda: "pipelines/ci-smoke.yaml" if "pipelines/ci-smoke.yaml" in _ci_script() else "",
}
WALKED = [name for name in PIPELINES if name not in RUN_ELSEWHERE]
# the walks that take longest start first, so the short ones fill in beside them (stage time on a
# 2-core CPU: imagefolder 46 s, its MobileNetV3 latency search; mnist-full 22 s; fashion_mnist
# 19 s; the others 12-16 s)
SLOWEST_FIRST = ("imagefolder.yaml", "mnist-full.yaml", "fashion_mnist.yaml")
FASHION = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _ci_script() -> str:
    return (REPO / ".ci" / "run").read_text(encoding="utf-8")


def _label(stage: dict[str, Any]) -> str:
    return stage.get("name") or stage["stage"]


def smoke_overrides(raw: dict[str, Any]) -> list[str]:
    """``--set`` budget cuts for every stage the file has; methods and structure stay as written."""
    sets = ["data.val_size=200", "data.limit_train=600", "data.limit_test=200"]
    for stage in raw["stages"]:
        at, kind = _label(stage), stage["stage"]
        if kind in ("train", "distill"):
            sets += [f"{at}.epochs=1", f"{at}.batch_size=32", f"{at}.warmup_epochs=0"]
        if kind == "distill":
            sets.append(f"{at}.seeds=1")
        if kind == "tune":
            sets += [f"{at}.n_trials=2", f"{at}.timeout=120"]
            if "finetune.epochs" in (stage.get("trial_overrides") or {}):
                sets.append(f"{at}.trial_overrides={{finetune.epochs: 1}}")
        if kind == "search":
            sets += [
                f"{at}.n_trials=3",
                f"{at}.rebuilds=1",
                f"{at}.max_drop_pp=100",  # something ships, so export, benchmark and report see it
                f"{at}.trial_budget={{train_images: 300, epochs: 1}}",
            ]
            for name, tech in (stage.get("techniques") or {}).items():
                settings = tech.get("settings", {}) if isinstance(tech, dict) else {}
                if "epochs" in settings:
                    sets.append(f"{at}.techniques.{name}.settings.epochs=1")
                if "epochs" in settings.get("finetune", {}):
                    sets.append(f"{at}.techniques.{name}.settings.finetune.epochs=1")
        if kind == "prune" and stage.get("finetune", {}) is not None:
            sets += [f"{at}.finetune.epochs=1", f"{at}.finetune.batch_size=32"]
            if stage.get("method") == "structured":
                sets.append(f"{at}.steps=1")
        if kind == "quantize":
            sets += [f"{at}.calibration.images=64", f"{at}.latency={{rounds: 1, runs: 1, batch_size: 8}}"]
            if {"qat", "auto"} & set(stage.get("modes", [])):
                sets += [f"{at}.qat.epochs=1", f"{at}.qat.batch_size=32"]  # auto needs its tolerance
            else:
                sets.append(f"{at}.tolerance=null")  # no per-layer fallback search on 200 images
            if stage.get("prefer") == "latency" and len(stage.get("from", [])) > 1:
                # the latency search costs a quantized file per node kind and mode, for each parent,
                # through the same code; the first parent walks it (tests/test_torchvision.py
                # quantizes a channel-pruned MobileNetV3 too)
                sets.append(f"{at}.from=[{stage['from'][0]}]")
        if kind == "export":
            sets += [f"{at}.parity_samples=100", f"{at}.targets=[onnx]"]
        if kind == "benchmark":
            sets += [
                f"{at}.batch_sizes=[1, 8]",
                f"{at}.warmup=1",
                f"{at}.repeats=5",
                f"{at}.min_seconds=0",
                f"{at}.max_seconds=2",
            ]
        if kind == "gates":
            for index, rule in enumerate(stage.get("rules", [])):
                if "min_accuracy" in rule:
                    sets.append(f"{at}.rules[{index}].min_accuracy=0")
                if "max_accuracy_drop" in rule:
                    sets.append(f"{at}.rules[{index}].max_accuracy_drop=100")
    return sets


def _write_fashion_mnist(root: Path, mnist_raw: Path) -> None:
    """Fashion-MNIST's four idx files in torchvision's layout, made of the real MNIST images (a
    learnable, full-size set) with digit c labelled ``(3c + 7) mod 10``: trained weights unlike
    MNIST's, as the other datasets' would be."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FASHION.values():
        data = bytearray(gzip.decompress((mnist_raw / f"{name}.gz").read_bytes()))
        if "labels" in name:
            labels = np.frombuffer(bytes(data[8:]), dtype=np.uint8).astype(np.int64)
            data[8:] = ((3 * labels + 7) % 10).astype(np.uint8).tobytes()
        (raw / name).write_bytes(bytes(data))


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    """A root per dataset the walked pipelines read: real MNIST, generated Fashion-MNIST, and an
    image folder of MNIST digits written as PNGs (through the project's own converter)."""
    base = tmp_path_factory.mktemp("pipeline-data")
    _write_fashion_mnist(base / "fashion", data_root / "MNIST" / "raw")
    folder = base / "mnist-png"
    made = finish_cli(
        start_cli(folder, "--train", 600, "--test", 200, cwd=base, data_root=data_root,
                  module="compress.data.to_imagefolder"),
        base,
    )  # fmt: skip
    assert made.returncode == 0, made.output
    return {"mnist": data_root, "fashion_mnist": base / "fashion", "imagefolder": folder}


def _walk(name: str, cwd: Path, data_roots: dict[str, Path]) -> tuple[CliResult, Path, dict[str, Any]]:
    """One shipped pipeline through the CLI with its budget cut: (result, working directory, YAML)."""
    raw = yaml.safe_load((REPO / "pipelines" / name).read_text(encoding="utf-8"))
    args: list[Any] = [REPO / "pipelines" / name, "-q", "--device", "cpu"]
    args += ["--data-root", data_roots[raw["data"]["dataset"]]]
    for override in smoke_overrides(raw):
        args += ["--set", override]
    return finish_cli(start_cli(*args, cwd=cwd), cwd, 900), cwd, raw


@pytest.fixture(scope="module")
def walked_runs(tmp_path_factory: pytest.TempPathFactory, data_roots: dict[str, Path]) -> dict[str, Any]:
    """Every walked pipeline, two running at any time (much of each run is single-threaded): the
    next starts as soon as one ends, the longest first."""
    order = sorted(WALKED, key=lambda n: SLOWEST_FIRST.index(n) if n in SLOWEST_FIRST else len(SLOWEST_FIRST))
    cwds = {name: tmp_path_factory.mktemp(name.removesuffix(".yaml")) for name in order}
    with ThreadPoolExecutor(max_workers=2) as pool:
        walks = {name: pool.submit(_walk, name, cwds[name], data_roots) for name in order}
        return {name: walk.result() for name, walk in walks.items()}


def test_pipelines_not_walked_here_still_run_elsewhere() -> None:
    for name, runner in RUN_ELSEWHERE.items():
        assert name in PIPELINES, f"{name} is gone; drop it from RUN_ELSEWHERE"
        assert runner().endswith(name), f"{name} is no longer run by the test named for it"


@pytest.mark.slow
@pytest.mark.parametrize("name", WALKED)
def test_every_shipped_pipeline_runs_end_to_end(name: str, walked_runs: dict[str, Any]) -> None:
    result, cwd, raw = walked_runs[name]
    assert result.returncode == 0, result.output[-4000:]
    assert "Traceback" not in result.output
    pipeline = raw.get("name") or name.removesuffix(".yaml")
    run_dir = (cwd / "artifacts" / pipeline / "latest").resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == [_label(s) for s in raw["stages"]]
    assert all(s["status"] == "ran" for s in manifest["stages"])
    assert manifest["data"]["dataset"] == raw["data"]["dataset"]
    baseline = manifest["variants"]["baseline"]["metrics"]
    assert baseline["test_count"] == 200 and 0 < baseline["test_accuracy"] <= 1, baseline
    for stage in raw["stages"]:
        if stage["stage"] == "prune" and stage.get("target_macs_reduction"):
            slim = manifest["variants"][stage.get("output") or "slim"]["metrics"]
            assert slim["macs_reduction"] >= stage["target_macs_reduction"], (stage, slim)
    if any(s["stage"] == "report" for s in raw["stages"]):
        html = (cwd / "reports" / pipeline / "latest.html").read_text(encoding="utf-8")
        assert "baseline" in html and "data:image/svg" in html
