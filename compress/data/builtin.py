"""The datasets torchvision knows by name, found in a data root in torchvision's layout and read
with torchvision's own dataset classes.

``locate`` finds a dataset's files (decompressing gzipped idx files once, trying torchvision's
download when allowed) and says exactly where it looked when they are missing; ``read`` turns
them into uint8 splits. torchvision checks an md5 of each file, which only the official
archives pass; here the pickles, ``.mat`` and binary files are checked for their layout instead
(and the pickles for holding only arrays), so re-packed copies and the generated test sets in
the same format are read too.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.config import DataConfig
from compress.data.bundle import Split
from compress.data.fingerprint import fingerprint
from compress.data.root import default_root, missing_message
from compress.errors import DataError
from compress.fileio import atomic_path

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# the official sets; a count other than these means truncated files or another dataset
EXPECTED_COUNTS = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000)}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
DOWNLOAD_TIMEOUT_S = 20


def _emnist_files(spec: DataConfig) -> tuple[str, ...]:
    split = spec.split_name()
    return tuple(
        f"emnist-{split}-{part}-{kind}-ubyte"
        for part in ("train", "test")
        for kind in ("images-idx3", "labels-idx1")
    )


@dataclass(frozen=True)
class Builtin:
    """One torchvision dataset: its folder under the root, the files it needs, how it is read."""

    name: str
    torchvision_class: str
    folder: str  # relative to the root; "" is the root itself (SVHN)
    kind: str  # idx | cifar | svhn | stl10
    files: Callable[[DataConfig], tuple[str, ...]]
    layout: str

    def files_needed(self, spec: DataConfig) -> tuple[str, ...]:
        return self.files(spec)


def _fixed(*names: str) -> Callable[[DataConfig], tuple[str, ...]]:
    return lambda spec: names


def _idx(name: str, cls: str) -> Builtin:
    return Builtin(name, cls, f"{cls}/raw", "idx", _fixed(*IDX_FILES),
                   f"<root>/{cls}/raw/ with the four idx files (gzipped .gz files are fine)")  # fmt: skip


BUILTINS: dict[str, Builtin] = {
    "mnist": _idx("mnist", "MNIST"),
    "fashion_mnist": _idx("fashion_mnist", "FashionMNIST"),
    "kmnist": _idx("kmnist", "KMNIST"),
    "emnist": Builtin(
        "emnist", "EMNIST", "EMNIST/raw", "idx", _emnist_files,
        "<root>/EMNIST/raw/ with emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte (or .gz)",
    ),
    "cifar10": Builtin(
        "cifar10", "CIFAR10", "cifar-10-batches-py", "cifar",
        _fixed(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
        "<root>/cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta",
    ),
    "cifar100": Builtin(
        "cifar100", "CIFAR100", "cifar-100-python", "cifar", _fixed("train", "test", "meta"),
        "<root>/cifar-100-python/ with train, test and meta",
    ),
    "svhn": Builtin(
        "svhn", "SVHN", "", "svhn", _fixed("train_32x32.mat", "test_32x32.mat"),
        "<root>/train_32x32.mat and <root>/test_32x32.mat",
    ),
    "stl10": Builtin(
        "stl10", "STL10", "stl10_binary", "stl10",
        _fixed("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"),
        "<root>/stl10_binary/ with train_X.bin, train_y.bin, test_X.bin and test_y.bin",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Located:
    """Where a dataset's files are: ``root`` is what torchvision reads from (the data root, or the
    user cache holding idx files decompressed from a read-only root)."""

    root: Path
    files: tuple[tuple[str, Path], ...]  # (folder/name, path), the names the fingerprint uses


def locate(spec: DataConfig, root: Path, source: str) -> Located:
    """The dataset's files, decompressed or downloaded if need be; DataError if they are not there.

    Only the root is searched: the user cache holds decompressed copies of a read-only root's
    ``.gz`` files (keyed by their content), never a dataset of its own, so a root without the
    data is an error even if another root's data was decompressed before.
    """
    info = BUILTINS[spec.dataset]
    names = info.files_needed(spec)
    folder = root / info.folder
    usable = root if _has_all(folder, names) else None
    if usable is None and info.kind == "idx":
        usable = _gunzip(root, info.folder, names)
    if usable is None and spec.download:
        _try_download(info, spec, root)
        usable = root if _has_all(folder, names) else None
    if usable is None:
        raise DataError(missing_message(spec.dataset, [folder], source, spec.download, info.layout))
    found = usable / info.folder
    return Located(usable, tuple((f"{info.folder}/{n}".lstrip("/"), found / n) for n in names))


def _has_all(folder: Path, names: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in names)


def _gunzip(root: Path, folder: str, names: tuple[str, ...]) -> Path | None:
    """Decompress ``*.gz`` idx files once: beside them if we may write there, else into the user
    cache, in a folder named by the compressed files' content (so it always matches them)."""
    raw = root / folder
    if not all((raw / f"{name}.gz").is_file() for name in names):
        return None
    if _writable(raw):
        target_root = root
    else:
        digest = fingerprint([(f"{name}.gz", raw / f"{name}.gz") for name in names])
        target_root = default_root() / f"gunzipped-{digest[:16]}"
    target = target_root / folder
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (target / name).is_file():
            continue
        try:
            with gzip.open(raw / f"{name}.gz", "rb") as src, atomic_path(target / name) as tmp:
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as exc:
            raise DataError(f"{raw / (name + '.gz')}: cannot be decompressed ({exc}); replace it") from None
    return target_root


def _writable(folder: Path) -> bool:
    """Honour the permission bits even as root, who may write anywhere: a folder marked
    read-only (like a shared dataset mount) is left untouched."""
    return bool(folder.stat().st_mode & stat.S_IWUSR) and os.access(folder, os.W_OK)


def _try_download(info: Builtin, spec: DataConfig, root: Path) -> None:
    """torchvision's own download (md5-checked archives); any failure just means "not here"."""
    cls = getattr(_torchvision(), info.torchvision_class)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for part in ("train", "test"):
            cls(str(root), download=True, **_split_args(info, spec, part))
    except Exception:  # no network, a mirror down, a read-only root
        return
    finally:
        socket.setdefaulttimeout(previous)


def _split_args(info: Builtin, spec: DataConfig, part: str) -> dict[str, Any]:
    """The constructor arguments that pick the train or test part of a torchvision dataset."""
    if info.kind in ("svhn", "stl10"):
        return {"split": part}
    extra = {"split": spec.split_name()} if info.name == "emnist" else {}
    return {"train": part == "train", **extra}


# ------------------------------------------------------------------ reading


def read(spec: DataConfig, located: Located) -> tuple[Split, Split, list[str]]:
    """(train, test, class names) as uint8 (N, C, H, W) images and int64 labels."""
    info = BUILTINS[spec.dataset]
    folder = located.root / info.folder
    if info.kind == "cifar":
        for _, path in located.files:
            _check_arrays_only(path)
    cls = _checked_classes()[info.torchvision_class]
    try:
        train = cls(str(located.root), **_split_args(info, spec, "train"))
        test = cls(str(located.root), **_split_args(info, spec, "test"))
    except Exception as exc:  # torchvision raises RuntimeError/ValueError/AssertionError/KeyError
        raise DataError(
            f"{folder}: the {spec.dataset} files do not parse ({type(exc).__name__}: {exc}); "
            "replace them with intact copies"
        ) from None
    splits = (_as_split(info, train, folder), _as_split(info, test, folder))
    expected = EXPECTED_COUNTS.get(spec.dataset)
    counts = (len(splits[0]), len(splits[1]))
    if expected is not None and counts != expected:
        raise DataError(
            f"{folder}: found {counts[0]} training and {counts[1]} test images, expected "
            f"{expected[0]} and {expected[1]}; the files are truncated or not {spec.dataset}"
        )
    return splits[0], splits[1], _classes(info, train)


def _as_split(info: Builtin, ds: Any, folder: Path) -> Split:
    if info.kind == "idx":
        x, y = ds.data.unsqueeze(1), ds.targets.long()
    elif info.kind == "cifar":
        x, y = torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets, dtype=torch.long)
    else:  # svhn, stl10: (N, 3, H, W) arrays
        x, y = torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels.astype(np.int64))
    if len(x) != len(y) or x.dim() != 4:
        raise DataError(f"{folder}: images and labels do not match ({tuple(x.shape)} vs {tuple(y.shape)})")
    return Split(x.contiguous(), y)


def _classes(info: Builtin, ds: Any) -> list[str]:
    if info.kind == "svhn":
        return [str(d) for d in range(10)]  # torchvision maps SVHN's label 10 to digit 0
    if info.kind == "stl10":
        return list(getattr(ds, "classes", STL10_CLASSES))
    return list(ds.classes)


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python files are pickles; this refuses any that would import code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _check_arrays_only(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            _ArraysOnlyUnpickler(handle, encoding="latin1").load()
    except Exception as exc:
        raise DataError(f"{path}: not a CIFAR batch file ({exc})") from None


def _load_meta_safely(self: Any) -> None:
    """CIFAR's meta file through the arrays-only unpickler (torchvision uses plain pickle)."""
    path = Path(self.root) / self.base_folder / self.meta["filename"]
    with open(path, "rb") as handle:
        meta = _ArraysOnlyUnpickler(handle, encoding="latin1").load()
    self.classes = meta[self.meta["key"]]
    self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def _torchvision() -> Any:
    """torchvision.datasets, imported on first use: importing torchvision costs ~2 s of CPU
    (it pulls in torch._dynamo), which every cached run and every bad-input exit would pay."""
    from torchvision import datasets

    return datasets


@lru_cache(maxsize=1)
def _checked_classes() -> dict[str, type]:
    """torchvision's dataset classes with the md5 check replaced by a check that the files exist
    (their content is checked on reading: pickles hold only arrays, shapes match)."""
    tvd = _torchvision()

    def files_exist(files: list[list[str]]) -> Callable[[Any], bool]:
        def check(self: Any) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, *_ in files)

        return check

    class CheckedCIFAR10(tvd.CIFAR10):
        _check_integrity = files_exist(tvd.CIFAR10.train_list + tvd.CIFAR10.test_list + [["batches.meta"]])
        _load_meta = _load_meta_safely

    class CheckedCIFAR100(tvd.CIFAR100):
        _check_integrity = files_exist(tvd.CIFAR100.train_list + tvd.CIFAR100.test_list + [["meta"]])
        _load_meta = _load_meta_safely

    class CheckedSVHN(tvd.SVHN):
        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.filename).is_file()

    class CheckedSTL10(tvd.STL10):
        base_folder = "stl10_binary"
        _check_integrity = files_exist(
            [[n] for n in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")]
        )

    return {
        "MNIST": tvd.MNIST,
        "FashionMNIST": tvd.FashionMNIST,
        "KMNIST": tvd.KMNIST,
        "EMNIST": tvd.EMNIST,
        "CIFAR10": CheckedCIFAR10,
        "CIFAR100": CheckedCIFAR100,
        "SVHN": CheckedSVHN,
        "STL10": CheckedSTL10,
    }
