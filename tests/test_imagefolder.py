"""``dataset: imagefolder``: a generated PNG/JPEG tree through the whole CLI, the cache keyed on
the images themselves, streaming from disk, and every way a folder can be wrong."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from compress import data
from compress.config import DataConfig
from compress.errors import DataError
from compress.run import main
from tests.conftest import run_cli, write_pipeline
from tests.dataset_files import FOLDER_CLASSES, folder_image, write_image_folder

PIPELINE = """\
seed: 0
device: cpu
data: {dataset: imagefolder, image_size: 24, channels: 3, val_size: 12}
stages:
  - stage: train
    model: {arch: lenet5, width: 0.5}
    epochs: 3
    batch_size: 16
    optimizer: {name: sgd, lr: 0.05}
  - stage: prune
    name: slim
    method: structured
    amount: 0.3
    finetune: {epochs: 1, batch_size: 16, optimizer: {name: sgd, lr: 0.01}, schedule: cosine}
  - stage: quantize
    from: [baseline]
    modes: [dynamic]
    latency: {rounds: 1, runs: 1}
  - stage: export
    parity_samples: 36
  - stage: benchmark
    runtimes: [onnxruntime]
    batch_sizes: [1]
    warmup: 1
    repeats: 5
    min_seconds: 0.01
  - stage: report
"""


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory):
    """The pipeline above on a generated three-class tree (with OS clutter and nested folders)."""
    cwd = tmp_path_factory.mktemp("imagefolder")
    tree = write_image_folder(cwd / "images")
    (tree / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (tree / "train" / "Thumbs.db").write_bytes(b"\0")
    nested = tree / "train" / "dog" / "more"
    nested.mkdir()
    folder_image(1, np.random.default_rng(9), (32, 32), "RGB").save(nested / "extra.png")
    pipeline = write_pipeline(cwd, PIPELINE, name="folder")
    env = {"XDG_CACHE_HOME": str(cwd / "cache")}
    result = run_cli(pipeline, "--data-root", tree, cwd=cwd, env=env)
    assert result.returncode == 0, result.output
    return cwd, tree, pipeline, env, result


@pytest.mark.slow
def test_whole_pipeline_on_an_image_folder(folder_run) -> None:
    cwd, tree, _, _, result = folder_run
    run_dir = (cwd / "artifacts" / "folder" / "latest").resolve()
    deploy = run_dir / "stages" / "export" / "deploy"
    assert json.loads((deploy / "labels.json").read_text()) == sorted(FOLDER_CLASSES)
    meta = {p.key: p.value for p in onnx.load(deploy / "baseline.onnx").metadata_props}
    assert json.loads(meta["labels"]) == sorted(FOLDER_CLASSES)
    recipe = json.loads(meta["preprocessing"])
    assert recipe["image_size"] == 24 and recipe["color"] == "RGB" and len(recipe["mean"]) == 3
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    assert set(stages) == {"train", "slim", "quantize", "export", "benchmark", "report"}
    assert stages["slim"]["metrics"]["macs_reduction"] > 1.2
    train = stages["train"]["metrics"]
    assert train["test_count"] == 36 and train["test_accuracy"] > 0.6  # three separable classes
    log = (run_dir / "run.log").read_text()
    assert "3 classes, train 121, test 36 images" in log  # the nested file counts, clutter does not
    assert "skipped 2 hidden or system files" in log
    rows = json.loads((cwd / "reports" / "folder" / "results.json").read_text())
    assert {r["variant"] for r in rows} == {"baseline", "slim", "baseline.int8-dynamic"}
    verify = run_cli(deploy, cwd=cwd, module="compress.verify")
    assert verify.returncode == 0, verify.output


@pytest.mark.slow
def test_cache_keys_on_the_images_not_the_folder_path(folder_run, tmp_path: Path) -> None:
    cwd, tree, pipeline, env, _ = folder_run
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)  # other paths and mtimes, the same bytes: every stage reused
    again = run_cli(pipeline, "--data-root", copy, "-q", cwd=cwd, env=env)
    assert again.returncode == 0, again.output
    assert "(1 ran, 5 cached)" in again.stdout  # only the report, which is rebuilt on every run
    image = copy / "test" / "owl" / "0003.png"
    Image.open(image).convert("RGB").rotate(90).save(image)  # one test image changes
    changed = run_cli(pipeline, "--data-root", copy, "-q", cwd=cwd, env=env)
    assert changed.returncode == 0, changed.output
    status = {
        s["name"]: s["status"]
        for s in json.loads((cwd / "artifacts" / "folder" / "latest" / "manifest.json").read_text())["stages"]
    }
    assert status["train"] == "ran" and status["export"] == "ran"
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run_cli(pipeline, "--data-root", empty, cwd=cwd, env=env)
    assert missing.returncode == 2 and "no train/ directory" in missing.stderr, missing.output


def test_streamed_and_in_memory_images_give_the_same_batches(tmp_path, isolated_cache) -> None:
    tree = write_image_folder(tmp_path / "images", per_class=(10, 4))
    spec = DataConfig(dataset="imagefolder", image_size=20, val_size=6)
    memory = data.load_data(spec, tree)
    streamed = data.load_data(spec.model_copy(update={"memory_limit_mb": 0, "workers": 1}), tree)
    assert isinstance(memory.train.x, torch.Tensor) and not isinstance(streamed.train.x, torch.Tensor)
    assert memory.mean == streamed.mean and memory.std == streamed.std
    device = torch.device("cpu")
    for a, b in zip(
        data.iterate_batches(memory, memory.train, 8, device, shuffle=True, seed=3, augment="crop_flip"),
        data.iterate_batches(streamed, streamed.train, 8, device, shuffle=True, seed=3, augment="crop_flip"),
        strict=True,
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(memory.test.x[:3], streamed.test.x[:3])


def test_a_val_folder_is_the_validation_split(tmp_path, isolated_cache) -> None:
    tree = write_image_folder(tmp_path / "images", per_class=(10, 4), val=3)
    bundle = data.load_data(DataConfig(dataset="imagefolder", image_size=16), tree)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 9, 12)


def test_limits_take_a_seeded_subset_of_every_class(tmp_path, isolated_cache) -> None:
    # a folder lists its images class by class: the first N would be the first classes only
    tree = write_image_folder(tmp_path / "images", per_class=(10, 8), val=3)
    spec = DataConfig(dataset="imagefolder", image_size=16, limit_train=12, limit_test=12)
    bundle = data.load_data(spec, tree)
    assert (len(bundle.train), len(bundle.test)) == (12, 12)
    classes = set(range(len(FOLDER_CLASSES)))
    assert set(bundle.train.y.tolist()) == classes and set(bundle.test.y.tolist()) == classes
    data.clear_caches()
    again = data.load_data(spec, tree)  # the same seed chooses the same images
    assert torch.equal(bundle.test.x, again.test.x) and torch.equal(bundle.train.y, again.train.y)


def test_decoded_images_are_cached_for_the_next_run(tmp_path, isolated_cache) -> None:
    tree = write_image_folder(tmp_path / "images", per_class=(6, 2))
    spec = DataConfig(dataset="imagefolder", image_size=16)
    first = data.load_data(spec, tree)
    cached = list((isolated_cache / "images").glob("*.pt"))
    assert len(cached) == 1
    data.clear_caches()
    again = data.load_data(spec, tree)
    assert torch.equal(first.train.x, again.train.x)


def test_different_sizes_need_image_size(tmp_path, isolated_cache) -> None:
    tree = write_image_folder(tmp_path / "images", per_class=(4, 2))
    with pytest.raises(DataError, match="not all one square size .*set data.image_size"):
        data.prepare(DataConfig(dataset="imagefolder"), tree)


# ---------------------------------------------------------------- bad folders


def _truncate(tree: Path) -> Path:
    path = tree / "train" / "dog" / "0001.png"
    path.write_bytes(path.read_bytes()[:80])
    return path


def _sixteen_bit(tree: Path) -> Path:
    path = tree / "train" / "cat" / "deep.png"
    Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16)).save(path)
    return path


def _cmyk(tree: Path) -> Path:
    path = tree / "test" / "owl" / "print.jpg"
    Image.new("CMYK", (24, 24), (10, 20, 30, 0)).save(path)
    return path


def _symlink_out(tree: Path) -> Path:
    outside = tree.parent / "elsewhere.png"
    shutil.copy(tree / "train" / "cat" / "0000.png", outside)
    link = tree / "train" / "cat" / "linked.png"
    os.symlink(outside, link)
    return link


def _empty_class(tree: Path) -> Path:
    folder = tree / "test" / "dog"
    shutil.rmtree(folder)
    folder.mkdir()
    return folder


def _test_class_not_in_train(tree: Path) -> Path:
    folder = tree / "test" / "fox"
    folder.mkdir()
    shutil.copy(tree / "test" / "cat" / "0000.png", folder / "0000.png")
    return folder


def _non_image(tree: Path) -> Path:
    path = tree / "train" / "owl" / "notes.txt"
    path.write_text("taken in the garden\n")
    return path


def _one_class(tree: Path) -> Path:
    for name in ("dog", "owl"):
        shutil.rmtree(tree / "train" / name)
        shutil.rmtree(tree / "test" / name)
    return tree / "train"


def _no_test(tree: Path) -> Path:
    shutil.rmtree(tree / "test")
    return tree


BAD = {
    "truncated image": (_truncate, "cannot be decoded"),
    "16-bit image": (_sixteen_bit, "more than 8 bits per channel"),
    "CMYK image": (_cmyk, "CMYK image"),
    "symlink out of the root": (_symlink_out, "outside the data root"),
    "empty class folder": (_empty_class, "empty class folder"),
    "test class not in train": (_test_class_not_in_train, "class 'fox' is not in train/"),
    "non-image file": (_non_image, "not an image file (extension '.txt')"),
    "one class": (_one_class, "only one class folder ('cat')"),
    "no test split": (_no_test, "there is no test/ directory"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folder_is_one_clear_error_and_nothing_is_written(
    case: str, tmp_path: Path, isolated_cache, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    tree = write_image_folder(tmp_path / "images", per_class=(5, 2))
    damage, fragment = BAD[case]
    named = damage(tree)
    pipeline = write_pipeline(tmp_path, PIPELINE, name="folder")
    monkeypatch.chdir(tmp_path)
    code = main([str(pipeline), "--data-root", str(tree), "--artifacts", "out/a", "--reports", "out/r"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {pipeline}: ") and err.count("\n") == 1, err
    assert fragment in err and str(named) in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
