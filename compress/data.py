"""Datasets from a data root, a seeded train/val/test split, and fast in-memory batches.

Small datasets are read once with torchvision's dataset classes and kept as uint8 tensors;
batches are normalised on the fly, so on a CPU the data never dominates an epoch. The test
split is only handed out through ``DataBundle.test``, which counts its readers: the tune
stage proves with it that tuning never looks at test data.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import platformdirs
import torch
import torch.nn.functional as F

from compress.config import DataConfig
from compress.errors import DataError
from compress.fileio import atomic_path

STATS = {  # per-channel mean/std of the training images in [0, 1]
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
EXPECTED_COUNTS = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000)}
DOWNLOAD_TIMEOUT_S = 20


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int | None) -> Split:
        return self if n is None else Split(self.x[:n], self.y[:n])


@dataclass
class DataBundle:
    dataset: str
    train: Split
    val: Split
    _test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    test_reads: int = field(default=0)

    @property
    def test(self) -> Split:
        self.test_reads += 1
        return self._test

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def model_fields(self) -> dict[str, int]:
        """What a zoo model needs to know about the data to build its input layer."""
        c, h, _ = self.input_shape
        return {"in_channels": c, "image_size": h, "num_classes": self.num_classes}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the float input the model was trained on."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def preprocessing(self) -> dict[str, object]:
        """The recipe an edge team must apply to raw pixels, recorded with every export."""
        return {
            "input_dtype": "float32",
            "layout": "NCHW",
            "scale": 1 / 255,
            "mean": list(self.mean),
            "std": list(self.std),
            "formula": "x = (pixels_uint8 / 255 - mean[c]) / std[c]",
        }


# ------------------------------------------------------------------ data root


def default_root() -> Path:
    return Path(platformdirs.user_cache_dir("compress")) / "datasets"


def resolve_root(cli_root: str | None, yaml_root: str | None, yaml_dir: Path) -> tuple[Path, str]:
    """The root by precedence: --data-root, COMPRESS_DATA_ROOT, data.root, user cache."""
    env_root = os.environ.get("COMPRESS_DATA_ROOT")
    for value, source, base in (
        (cli_root, "--data-root", Path.cwd()),
        (env_root, "COMPRESS_DATA_ROOT", Path.cwd()),
        (yaml_root, "data.root", yaml_dir),
    ):
        if value:
            path = (base / Path(value).expanduser()).resolve()
            if not path.is_dir():
                raise DataError(
                    f"data root {path} (from {source}) does not exist or is not a directory; "
                    "point it at the folder that holds MNIST/raw, FashionMNIST/raw or "
                    "cifar-10-batches-py"
                )
            return path, source
    return default_root(), "default cache directory"


# ------------------------------------------------------------------ loading


def load_data(spec: DataConfig, root: Path, source: str = "") -> DataBundle:
    """The dataset split as the spec says; cached in memory per (spec, root)."""
    full_train, test, classes = _read_dataset(spec.dataset, str(root), spec.download, source)
    if spec.val_size >= len(full_train):
        raise DataError(
            f"data.val_size={spec.val_size} leaves no training images ({len(full_train)} available); lower it"
        )
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(spec.split_seed))
    val_idx, train_idx = order[: spec.val_size], order[spec.val_size :]
    train = Split(full_train.x[train_idx], full_train.y[train_idx]).head(spec.limit_train)
    val = Split(full_train.x[val_idx], full_train.y[val_idx])
    mean, std = STATS[spec.dataset]
    return DataBundle(
        dataset=spec.dataset,
        train=train,
        val=val,
        _test=test.head(spec.limit_test),
        classes=classes,
        mean=mean,
        std=std,
        source=str(root),
    )


@lru_cache(maxsize=4)
def _read_dataset(
    dataset: str, root_text: str, download: bool, source: str
) -> tuple[Split, Split, list[str]]:
    root = Path(root_text)
    if dataset == "cifar10":
        return _read_cifar10(root, download, source)
    return _read_mnist_like(dataset, root, download, source)


def _read_mnist_like(dataset: str, root: Path, download: bool, source: str) -> tuple[Split, Split, list[str]]:
    cls = _torchvision_datasets()[dataset]
    folder = cls.__name__
    cache = default_root()
    searched = [root / folder / "raw"] + ([cache / folder / "raw"] if cache != root else [])
    usable = next((r for r in (root, cache) if _has_idx(r / folder / "raw")), None)
    if usable is None:
        usable = _gunzip_idx(root, cache, folder)
    if usable is None and download:
        usable = _try_download(cls, root, searched, source)
    if usable is None:
        raise DataError(_missing_message(dataset, searched, source, download, folder))
    try:
        train_ds, test_ds = cls(str(usable), train=True), cls(str(usable), train=False)
    except Exception as exc:  # torchvision raises RuntimeError/ValueError/AssertionError
        raise DataError(
            f"{usable / folder / 'raw'}: the {dataset} files do not parse ({exc}); "
            "replace them with intact copies"
        ) from None
    expected = EXPECTED_COUNTS[dataset]
    counts = (len(train_ds.targets), len(test_ds.targets))
    if counts != expected:
        raise DataError(
            f"{usable / folder / 'raw'}: found {counts[0]} training and {counts[1]} test images, "
            f"expected {expected[0]} and {expected[1]}; the files are truncated or not {dataset}"
        )
    return (
        Split(train_ds.data.unsqueeze(1).contiguous(), train_ds.targets.long()),
        Split(test_ds.data.unsqueeze(1).contiguous(), test_ds.targets.long()),
        list(train_ds.classes),
    )


def _has_idx(raw: Path) -> bool:
    return all((raw / name).is_file() for name in IDX_FILES)


def _gunzip_idx(root: Path, cache: Path, folder: str) -> Path | None:
    """Decompress ``*.gz`` idx files once: beside them if we may write there, else in the cache."""
    raw = root / folder / "raw"
    if not all((raw / f"{name}.gz").is_file() for name in IDX_FILES):
        return None
    target_root = root if _writable(raw) else cache
    target = target_root / folder / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
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


def _try_download(cls: type, root: Path, searched: list[Path], source: str) -> Path | None:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
        return root
    except Exception:  # no network, a mirror down, a read-only root: all mean "not here"
        return None
    finally:
        socket.setdefaulttimeout(previous)


def _missing_message(dataset: str, searched: list[Path], source: str, download: bool, folder: str) -> str:
    tried = "; the download failed (no network?)" if download else " (data.download is false)"
    places = "\n".join(f"  - {p}" for p in searched)
    layout = (
        f"<root>/{folder}/raw/ with the four idx files (gzipped .gz files are fine)"
        if folder != "cifar-10-batches-py"
        else "<root>/cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta"
    )
    return (
        f"dataset {dataset!r} not found (data root from {source or 'default'}){tried}.\n"
        f"Looked in:\n{places}\n"
        f"Provide it as {layout}, then pass --data-root DIR, set COMPRESS_DATA_ROOT=DIR, "
        "or set data.root in the pipeline YAML."
    )


CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
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
    """CIFAR-10's python files are pickles; this refuses any that would import code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


@lru_cache(maxsize=1)
def _torchvision_datasets() -> dict[str, type]:
    """torchvision's dataset classes, imported on first use: importing torchvision costs ~2 s
    of CPU (it pulls in torch._dynamo), which every cached run and every bad-input exit would pay."""
    from torchvision import datasets as tvd

    class LayoutCheckedCIFAR10(tvd.CIFAR10):
        """torchvision's CIFAR10 with its md5 check replaced by a layout and safety check.

        The md5 list only matches the official archive; files in the same layout (our generated
        test sets, re-packed copies) are accepted once every file has been proven to hold only
        arrays, lists and strings.
        """

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name in CIFAR_FILES)

        def _load_meta(self) -> None:
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            with open(path, "rb") as handle:
                meta = _ArraysOnlyUnpickler(handle, encoding="latin1").load()
            self.classes = meta[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return {
        "mnist": tvd.MNIST,
        "fashion_mnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar10_checked": LayoutCheckedCIFAR10,
    }


def _read_cifar10(root: Path, download: bool, source: str) -> tuple[Split, Split, list[str]]:
    folder = root / "cifar-10-batches-py"
    if not all((folder / n).is_file() for n in CIFAR_FILES) and download:
        _try_download(_torchvision_datasets()["cifar10"], root, [folder], source)
    if not all((folder / n).is_file() for n in CIFAR_FILES):
        raise DataError(_missing_message("cifar10", [folder], source, download, folder.name))
    for name in CIFAR_FILES:
        try:
            with open(folder / name, "rb") as handle:
                _ArraysOnlyUnpickler(handle, encoding="latin1").load()
        except Exception as exc:
            raise DataError(f"{folder / name}: not a CIFAR-10 batch file ({exc})") from None
    try:
        checked = _torchvision_datasets()["cifar10_checked"]
        train_ds = checked(str(root), train=True)
        test_ds = checked(str(root), train=False)
    except Exception as exc:
        raise DataError(f"{folder}: the CIFAR-10 files do not parse ({exc})") from None

    def to_split(ds: Any) -> Split:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor(ds.targets, dtype=torch.long)
        if len(x) != len(y) or x.shape[1:] != (3, 32, 32):
            raise DataError(f"{folder}: images and labels do not match ({x.shape} vs {y.shape})")
        return Split(x, y)

    return to_split(train_ds), to_split(test_ds), list(train_ds.classes)


# ------------------------------------------------------------------ batches


def iterate_batches(
    bundle: DataBundle,
    split: Split,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: str = "none",
    indices: torch.Tensor | None = None,
    with_index: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Normalised (x, y) batches on ``device``; the shuffle order depends only on ``seed``.

    With ``with_index`` each batch is (x, y, idx), idx being the rows of ``split`` (on the CPU),
    so per-image values computed once (e.g. cached teacher logits) can be looked up.
    """
    generator = torch.Generator().manual_seed(seed)
    order = indices if indices is not None else torch.arange(len(split))
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    non_blocking = device.type == "cuda"
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x, y = split.x[idx], split.y[idx]
        if augment != "none":
            x = _augment(x, augment, generator)
        if non_blocking:  # page-locked: the host-to-GPU copy runs asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(device, non_blocking=non_blocking)
        if with_index:
            yield bundle.normalize(x), y.to(device, non_blocking=non_blocking), idx
        else:
            yield bundle.normalize(x), y.to(device, non_blocking=non_blocking)


def _augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Per-image random translation (pad 2 for 'shift', pad 4 + h-flip for 'crop_flip')."""
    pad = 2 if kind == "shift" else 4
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if kind == "crop_flip":
        flip = torch.rand(b, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def calibration_images(bundle: DataBundle, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` normalised training images (never validation or test) for int8 calibration."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(bundle.train), generator=generator)[:count]
    return bundle.normalize(bundle.train.x[idx])
