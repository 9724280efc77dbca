"""torchvision's other datasets by name (KMNIST, EMNIST, SVHN, CIFAR-100, STL-10), read from
generated files in their real formats, resized/converted on request, and missing ones offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress import data
from compress.config import DataConfig
from compress.errors import DataError
from tests.conftest import run_cli, write_pipeline
from tests.dataset_files import write_cifar100, write_emnist, write_kmnist, write_stl10, write_svhn

NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


CASES = [
    ("kmnist", {}, write_kmnist, (1, 28, 28), 10, "o"),
    ("emnist", {"emnist_split": "digits"}, lambda r: write_emnist(r, "digits"), (1, 28, 28), 10, "0"),
    ("svhn", {}, write_svhn, (3, 32, 32), 10, "0"),
    ("cifar100", {}, write_cifar100, (3, 32, 32), 100, "class_00"),
    ("stl10", {}, write_stl10, (3, 96, 96), 10, "airplane"),
]


@pytest.mark.parametrize(
    ("dataset", "extra", "write", "shape", "classes", "first"), CASES, ids=[c[0] for c in CASES]
)
def test_builtin_dataset_reads_its_real_format(
    tmp_path, isolated_cache, dataset, extra, write, shape, classes, first
) -> None:
    write(tmp_path)
    bundle = data.load_data(DataConfig(dataset=dataset, **extra), tmp_path)
    assert bundle.input_shape == shape and bundle.num_classes == classes
    assert bundle.classes[0] == first
    assert bundle.train.x.dtype == torch.uint8
    assert 0 < len(bundle.val) < len(bundle.train)  # the default split: 10 %
    assert len(bundle.val) == int(0.1 * (len(bundle.train) + len(bundle.val)))
    assert set(bundle.test.y.tolist()) <= set(range(classes))
    # computed statistics (not published for these sets), one per channel, recorded for export
    assert len(bundle.mean) == shape[0] and all(0 < s < 1 for s in bundle.std)
    assert bundle.preprocessing()["mean"] == list(bundle.mean)


def test_svhn_labels_ten_become_digit_zero(tmp_path, isolated_cache) -> None:
    from scipy.io import loadmat

    write_svhn(tmp_path)
    raw = loadmat(tmp_path / "test_32x32.mat")["y"].ravel()
    bundle = data.load_data(DataConfig(dataset="svhn", val_size=10), tmp_path)
    assert 10 in raw and torch.equal(bundle.test.y, torch.from_numpy(raw % 10).long())


def test_resize_and_channels_apply_to_builtin_datasets(tmp_path, isolated_cache) -> None:
    write_stl10(tmp_path)
    bundle = data.load_data(DataConfig(dataset="stl10", image_size=32, channels=1, val_size=10), tmp_path)
    assert bundle.input_shape == (1, 32, 32)
    recipe = bundle.preprocessing()
    assert recipe["image_size"] == 32 and recipe["color"] == "grayscale" and "center-crop" in recipe["resize"]


def test_fingerprint_follows_the_files_not_their_location(tmp_path, isolated_cache) -> None:
    write_kmnist(tmp_path / "a")
    write_kmnist(tmp_path / "b")  # the same generated files elsewhere
    spec = DataConfig(dataset="kmnist")
    first = data.prepare(spec, tmp_path / "a").fingerprint
    assert data.prepare(spec, tmp_path / "b").fingerprint == first
    raw = tmp_path / "b" / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    content = bytearray(raw.read_bytes())
    content[-1] = (content[-1] + 1) % 10
    raw.write_bytes(bytes(content))
    data.clear_caches()
    assert data.prepare(spec, tmp_path / "b").fingerprint != first


@pytest.mark.parametrize("dataset", ["kmnist", "emnist", "svhn", "cifar100", "stl10"])
def test_missing_dataset_offline_names_where_it_looked(
    tmp_path, isolated_cache, dataset, monkeypatch
) -> None:
    for key, value in NO_NETWORK.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DataError) as caught:
        data.prepare(DataConfig(dataset=dataset), tmp_path)
    text = str(caught.value)
    assert f"dataset {dataset!r} not found" in text and "Looked in" in text and str(tmp_path) in text
    assert "--data-root" in text and "COMPRESS_DATA_ROOT" in text


@pytest.mark.slow
def test_kmnist_pipeline_through_the_cli(tmp_path: Path) -> None:
    write_kmnist(tmp_path / "datasets", n=(400, 100))
    pipeline = write_pipeline(
        tmp_path,
        """\
device: cpu
data: {dataset: kmnist, val_size: 50}
stages:
  - stage: train
    model: {arch: lenet5, width: 0.5}
    epochs: 2
    batch_size: 32
""",
    )
    env = {**NO_NETWORK, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run_cli(pipeline, "-q", cwd=tmp_path, data_root=tmp_path / "datasets", env=env)
    assert result.returncode == 0, result.output
    accuracy = float(result.stdout.split("test accuracy ")[1].split("%")[0])
    assert accuracy > 25  # ten classes of grey stripes: well above chance (10 %) after two epochs
