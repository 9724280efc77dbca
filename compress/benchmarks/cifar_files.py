"""A small, learnable CIFAR-10 set written in the original python-pickle layout.

Generated benchmark and test data: ``ddp_epoch`` trains on it when no real CIFAR-10 is given,
and the tests run ``pipelines/cifar10.yaml`` and the dataset readers on it.

The real ``cifar-10-batches-py`` files were pickled by Python 2 (protocol 2), so their keys and
strings are Python 2 ``str``: ``pickle.load(f, encoding="bytes")`` gives ``b"data"`` keys and
``encoding="latin1"`` (what torchvision uses) gives ``"data"`` keys. Python 3's pickler would
write ``bytes`` as ``_codecs.encode`` calls instead, which load back as ``bytes`` under every
encoding; ``_Py2Pickler`` below writes them with the Python 2 string opcodes, so the files
load exactly like the real ones.

Each class has its own colour and stripe texture (random phase, so crops and flips keep it),
plus per-image colour jitter and pixel noise: a ResNet-20 beats chance after one short epoch,
yet the task is not solved by a single pixel.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

LABEL_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

# Well separated base colours (RGB, 0..255), one per class.
_PALETTE = np.array(
    [
        [200, 60, 60],
        [60, 200, 60],
        [60, 60, 200],
        [200, 200, 60],
        [200, 60, 200],
        [60, 200, 200],
        [230, 140, 40],
        [130, 130, 130],
        [40, 120, 230],
        [150, 90, 40],
    ],
    dtype=np.float32,
)
# Stripe texture per class: (orientation 0=horizontal 1=vertical, spatial period in pixels).
_STRIPES = [(0, 4), (1, 4), (0, 8), (1, 8), (0, 16), (1, 16), (0, 6), (1, 6), (0, 12), (1, 12)]


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is extensible
    """Protocol-2 pickler that writes ``bytes`` as Python 2 ``str`` (like the original files)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        # numpy 2 names its reconstructor numpy._core.multiarray; the originals (and every numpy)
        # use numpy.core.multiarray.
        qualified = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__name__', '')}"
        if qualified in ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"):
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dump_py2_pickle(obj: object, path: Path) -> None:
    """Pickle ``obj`` to ``path`` as Python 2 wrote the original files (see the module docstring)."""
    with open(path, "wb") as handle:
        _Py2Pickler(handle, protocol=2).dump(obj)


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 images (N, 3, 32, 32) whose colour and stripes depend on the label."""
    n = len(labels)
    coords = np.arange(32, dtype=np.float32)
    images = np.empty((n, 3, 32, 32), dtype=np.float32)
    for i, label in enumerate(labels):
        orientation, period = _STRIPES[label]
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * coords / period + phase)
        texture = np.repeat(wave[:, None], 32, axis=1) if orientation == 0 else np.repeat(wave[None], 32, 0)
        colour = _PALETTE[label] + rng.normal(0, 25, 3)
        contrast = rng.uniform(25, 55)
        images[i] = colour[:, None, None] + contrast * texture[None]
    images += rng.normal(0, 30, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def _batch(label: str, labels: np.ndarray, rng: np.random.Generator, first: int) -> dict:
    images = make_images(labels, rng)
    return {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(labels), 3072),  # R plane, G plane, B plane, each row-major
        b"filenames": [f"{LABEL_NAMES[v]}_s_{first + i:06d}.png".encode() for i, v in enumerate(labels)],
    }


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % 10)


def write_cifar10(root: Path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/`` (5 training batches, test batch, meta); return the folder.

    ``n_train`` images are spread over ``data_batch_1..5`` (the first batches take the remainder),
    ``n_test`` go to ``test_batch``; both are class-balanced. Deterministic for a given seed.
    """
    if n_train < 5 or n_test < 1:
        raise ValueError("need at least 5 training images (one per batch) and 1 test image")
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = _balanced_labels(n_train, rng)
    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    start = 0
    for index, size in enumerate(sizes, start=1):
        labels = train_labels[start : start + size]
        dump_py2_pickle(
            _batch(f"training batch {index} of 5", labels, rng, start), folder / f"data_batch_{index}"
        )
        start += size
    test = _batch("testing batch 1 of 1", _balanced_labels(n_test, rng), rng, n_train)
    dump_py2_pickle(test, folder / "test_batch")
    meta = {
        b"label_names": [name.encode() for name in LABEL_NAMES],
        b"num_cases_per_batch": max(sizes),
        b"num_vis": 3072,
    }
    dump_py2_pickle(meta, folder / "batches.meta")
    return folder
