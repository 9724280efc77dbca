"""From prepared files to the ``DataBundle`` stages use: shape, seeded split, limits, statistics.

The train/validation split is seeded by ``data.split_seed`` alone, so it never changes with
the training seed; an image folder's own ``val/`` replaces it. ``mean``/``std`` come from the
YAML, else the published values of MNIST, Fashion-MNIST and CIFAR-10 (at their own channel
count), else they are computed once from the training split and cached in the user cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compress.config import DataConfig
from compress.data import builtin, fingerprint, source
from compress.data.bundle import DataBundle, Pixels, Split
from compress.data.images import DiskImages, ImageShape, decoded_batches
from compress.data.root import cache_dir
from compress.data.source import DataSource, prepare
from compress.errors import DataError
from compress.fileio import read_json, sha256_json, write_json

log = logging.getLogger("compress")

STATS = {  # per-channel mean/std of the training images in [0, 1], as published
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
DEFAULT_VAL_SHARE, DEFAULT_VAL_MAX = 0.1, 5000


def load_data(
    spec: DataConfig, root: Path | None = None, source: str = "", prepared: DataSource | None = None
) -> DataBundle:
    """The dataset split as the spec says; ``prepared`` (from ``prepare``) saves finding it again."""
    if prepared is None:
        if root is None:
            raise ValueError("load_data needs a data root or a prepared source")
        prepared = prepare(spec, Path(root), source)
    train_all, val, test, classes, resize = _splits(prepared)
    if val is None:
        count = _val_size(spec, len(train_all))
        order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(spec.split_seed))
        val, train_all = train_all.rows(order[:count]), train_all.rows(order[count:])
    else:
        if spec.val_size is not None:
            log.info("data: %s/val/ is the validation split; data.val_size is not used", prepared.root)
        if spec.limit_train is not None:  # train/ as listed, class by class: take a seeded subset
            train_all = _seeded_subset(train_all, spec.limit_train, spec.split_seed)
    train = train_all.head(spec.limit_train)
    if prepared.scan is not None and spec.limit_test is not None:
        test = _seeded_subset(test, spec.limit_test, spec.split_seed)  # folders list class by class
    mean, std = _statistics(spec, prepared, train, train.x.shape[1])
    return DataBundle(
        dataset=spec.dataset,
        train=train,
        val=val,
        _test=test.head(spec.limit_test),
        classes=classes,
        mean=mean,
        std=std,
        source=str(prepared.root),
        resize=resize,
        workers=spec.workers,
        fingerprint=prepared.fingerprint,
    )


def _val_size(spec: DataConfig, available: int) -> int:
    count = spec.val_size
    if count is None:
        count = min(DEFAULT_VAL_MAX, int(available * DEFAULT_VAL_SHARE))
    if count >= available:
        raise DataError(f"data.val_size={count} leaves no training images ({available} available); lower it")
    return count


def _seeded_subset(split: Split, n: int, seed: int) -> Split:
    """``n`` rows chosen with ``seed``, in their original order: an image folder lists its images
    class by class, so its first ``n`` would leave out the last classes."""
    if n >= len(split):
        return split
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return split.rows(chosen.sort().values)


def _splits(prepared: DataSource) -> tuple[Split, Split | None, Split, list[str], dict]:
    """(train, val or None, test, classes, resize recipe) before the split and the limits."""
    spec = prepared.spec
    if prepared.scan is not None:
        assert prepared.shape is not None and prepared.side is not None
        recipe = prepared.shape.describe()
        parts: dict[str, tuple[Pixels, torch.Tensor]]
        if prepared.decoded is not None:
            tensors = prepared.decoded["tensors"]
            parts = {s: (tensors[f"{s}_x"], tensors[f"{s}_y"]) for s in prepared.scan.items}
        else:
            parts = {
                split: (DiskImages([p for p, _ in rows], prepared.shape, prepared.side), _labels(rows))
                for split, rows in prepared.scan.items.items()
            }
        split = {name: Split(x, y) for name, (x, y) in parts.items()}
        return split["train"], split.get("val"), split["test"], list(prepared.scan.classes), recipe
    raw_train, raw_test, classes = _memo(
        ("raw", prepared.fingerprint), lambda: builtin.read(spec, prepared.located)
    )
    native = int(raw_train.x.shape[1])
    if spec.image_size is None and spec.channels in (None, native):
        return raw_train, None, raw_test, classes, {}
    shape = ImageShape(spec.image_size, spec.channels or native)

    def shaped() -> tuple[Split, Split]:
        return Split(shape.apply_tensor(raw_train.x), raw_train.y), Split(
            shape.apply_tensor(raw_test.x), raw_test.y
        )

    train, test = _memo(("shaped", prepared.fingerprint, shape), shaped)
    return train, None, test, classes, shape.describe()


def _labels(rows: list[tuple[Path, int]]) -> torch.Tensor:
    return torch.tensor([c for _, c in rows], dtype=torch.long)


_MEMO: dict[tuple, Any] = {}  # datasets read (and reshaped) in this process; the last few only


def _memo(key: tuple, make: Callable[[], Any]) -> Any:
    if key not in _MEMO:
        while len(_MEMO) >= 4:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = make()
    return _MEMO[key]


def clear_caches() -> None:
    """Forget every dataset, decoded folder and file hash this process holds (tests)."""
    _MEMO.clear()
    source.clear()
    fingerprint.clear()


# ------------------------------------------------------------------ mean and std


def _statistics(
    spec: DataConfig, prepared: DataSource, train: Split, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if spec.mean is not None and spec.std is not None:
        if len(spec.mean) != channels:
            raise DataError(
                f"data.mean has {len(spec.mean)} values, but the images have {channels} channel(s)"
            )
        return tuple(spec.mean), tuple(spec.std)
    published = STATS.get(spec.dataset)
    if published is not None and len(published[0]) == channels:
        return published
    if published is not None and len(published[0]) == 1:  # a grayscale set converted to RGB
        return published[0] * channels, published[1] * channels
    key = sha256_json(
        {
            "fingerprint": prepared.fingerprint,
            "shape": list(train.x.shape[1:]),
            "split": [spec.split_seed, spec.val_size, spec.limit_train],
        }
    )
    path = cache_dir() / "stats" / f"{key[:32]}.json"
    try:
        cached = read_json(path)
        return tuple(cached["mean"]), tuple(cached["std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mean, std = channel_statistics(train, spec.workers)
    log.info("data: mean %s, std %s computed from %d training images", mean, std, len(train))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"mean": list(mean), "std": list(std), "images": len(train)})
    except OSError:
        pass
    return mean, std


def channel_statistics(split: Split, workers: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of pixels scaled to [0, 1], in float64 over chunks."""
    total = square = None
    count = 0
    for pixels in _chunks(split.x, workers):
        values = pixels.to(torch.float64).div_(255)
        sums, squares = values.sum(dim=(0, 2, 3)), values.pow(2).sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        square = squares if square is None else square + squares
        count += values.shape[0] * values.shape[2] * values.shape[3]
    if total is None or square is None or count == 0:
        raise DataError("data: no training images to compute mean/std from; set data.mean and data.std")
    mean = total / count
    std = (square / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _chunks(x: Pixels, workers: int, size: int = 4096):  # noqa: ANN202 - a generator of tensors
    if not isinstance(x, DiskImages):
        for start in range(0, len(x), size):
            yield x[start : start + size]
        return
    for pixels, _, problems in decoded_batches(
        x.paths, x.image_shape, x.shape[1:], range(len(x)), 256, workers
    ):
        if problems:
            raise DataError(problems[0])
        yield pixels
