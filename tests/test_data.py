"""Data roots, gzipped idx files, splits, CIFAR-10's pickle layout and missing-data errors."""

from __future__ import annotations

import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch

from compress import data
from compress.benchmarks.cifar_files import write_cifar10
from compress.config import DataConfig
from compress.errors import DataError
from tests.conftest import TINY_PIPELINE, run_cli, write_pipeline

NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def _copy_gz(data_root: Path, target: Path) -> Path:
    raw = target / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.IDX_FILES:
        shutil.copy(data_root / "MNIST" / "raw" / f"{name}.gz", raw / f"{name}.gz")
    return raw


def test_gzipped_idx_files_are_decompressed_beside_them(
    tmp_path: Path, data_root: Path, isolated_cache: Path
) -> None:
    raw = _copy_gz(data_root, tmp_path / "root")
    bundle = data.load_data(DataConfig(val_size=5000), tmp_path / "root")
    assert all((raw / name).is_file() for name in data.IDX_FILES)
    assert not (isolated_cache / "datasets").exists()
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (55000, 5000, 10000)
    assert bundle.train.x.dtype == torch.uint8 and bundle.input_shape == (1, 28, 28)
    # The README's first test labels: 7 2 1 0 4 1 4 9 5 9.
    assert bundle.test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_read_only_root_decompresses_into_the_user_cache(
    tmp_path: Path, data_root: Path, isolated_cache: Path
) -> None:
    raw = _copy_gz(data_root, tmp_path / "root")
    for folder in (raw, raw.parent, raw.parent.parent):
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        bundle = data.load_data(DataConfig(), tmp_path / "root")
    finally:
        for folder in (raw.parent.parent, raw.parent, raw):
            folder.chmod(stat.S_IRWXU)
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{n}.gz" for n in data.IDX_FILES)
    (copy,) = (isolated_cache / "datasets").glob("gunzipped-*")  # named by the .gz files' content
    assert all((copy / "MNIST" / "raw" / n).is_file() for n in data.IDX_FILES)
    assert len(bundle.test) == 10000


def test_a_root_without_the_data_is_an_error_even_when_a_copy_was_decompressed(
    tmp_path: Path, data_root: Path, isolated_cache: Path
) -> None:
    data.load_data(DataConfig(val_size=100), data_root)  # decompressed into the cache (read-only root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="dataset 'mnist' not found"):
        data.prepare(DataConfig(download=False), empty)


def test_split_is_seeded_disjoint_and_limited(data_root: Path) -> None:
    spec = DataConfig(val_size=1000, limit_train=300, limit_test=200, split_seed=3)
    a = data.load_data(spec, data_root)
    b = data.load_data(spec, data_root)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert (len(a.train), len(a.val), len(a.test)) == (300, 1000, 200)
    other = data.load_data(DataConfig(val_size=1000, split_seed=4), data_root)
    assert not torch.equal(a.val.x, other.val.x)
    flat = lambda t: {bytes(row) for row in t.reshape(len(t), -1).numpy()}  # noqa: E731
    assert not flat(a.train.x) & flat(a.val.x)


def test_val_size_larger_than_training_set_is_an_error(data_root: Path) -> None:
    with pytest.raises(DataError, match="val_size"):
        data.load_data(DataConfig(val_size=60000), data_root)


def test_batches_are_normalised_and_augmented_per_image(data_root: Path) -> None:
    bundle = data.load_data(DataConfig(val_size=0, limit_train=64), data_root)
    plain = next(data.iterate_batches(bundle, bundle.train, 64, torch.device("cpu")))[0]
    assert abs(plain.mean().item()) < 0.5 and 0.5 < plain.std().item() < 1.5
    shifted = next(
        data.iterate_batches(bundle, bundle.train, 64, torch.device("cpu"), augment="shift", seed=1)
    )[0]
    assert shifted.shape == plain.shape
    changed = (shifted != plain).flatten(1).any(1)
    assert 0.5 < changed.float().mean().item() <= 1.0  # most images moved, independently


def _write_cifar(folder: Path, per_batch: int = 12, payload: object | None = None) -> None:
    """The shared generated set (compress/benchmarks/cifar_files.py); ``payload`` replaces the test batch."""
    write_cifar10(folder.parent, n_train=5 * per_batch, n_test=per_batch)
    if payload is not None:
        with open(folder / "test_batch", "wb") as handle:
            pickle.dump(payload, handle)


def test_cifar10_reads_the_python_pickle_layout(tmp_path: Path, isolated_cache: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    bundle = data.load_data(DataConfig(dataset="cifar10", val_size=10), tmp_path)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (50, 10, 12)
    assert bundle.input_shape == (3, 32, 32)
    assert bundle.classes[0] == "airplane" and bundle.num_classes == 10
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")  # Python 2 pickles, like the real files
    first = torch.from_numpy(raw["data"][0].reshape(3, 32, 32))
    assert torch.equal(bundle.test.x[0], first)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_refuses_pickles_that_import_code(tmp_path: Path, isolated_cache: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py", payload={"data": _Exploit()})
    with pytest.raises(DataError, match="refusing to load"):
        data.load_data(DataConfig(dataset="cifar10", val_size=10), tmp_path)


def test_missing_dataset_without_network_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty-root"
    empty.mkdir()
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE)
    env = {**NO_NETWORK, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run_cli(pipeline, cwd=tmp_path, data_root=empty, env=env, timeout=180)
    assert result.returncode == 2, result.output
    assert "dataset 'mnist' not found" in result.stderr
    assert str(empty / "MNIST" / "raw") in result.stderr
    assert "--data-root" in result.stderr and "COMPRESS_DATA_ROOT" in result.stderr
    assert "Traceback" not in result.output
