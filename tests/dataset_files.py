"""Small sets in the real on-disk formats of torchvision's datasets, and image-folder trees.

None of these datasets can be downloaded here, so each writer produces the exact files
torchvision reads (idx for KMNIST/EMNIST, MATLAB ``.mat`` for SVHN, python pickles for
CIFAR-100, raw binaries for STL-10), with learnable class-dependent images from
``compress.benchmarks.cifar_files.make_images``. ``write_image_folder`` writes an ImageFolder tree of PNG/JPEG
files in several sizes and Pillow modes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from compress.benchmarks.cifar_files import dump_py2_pickle, make_images

KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


def _labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes)


def _gray(labels: np.ndarray, rng: np.random.Generator, side: int = 28) -> np.ndarray:
    """(N, side, side) uint8: the RGB class images' mean, cropped/padded to ``side``."""
    rgb = make_images(labels % 10, rng).mean(axis=1)
    out = np.zeros((len(labels), side, side), dtype=np.float32)
    s = min(side, 32)
    out[:, :s, :s] = rgb[:, :s, :s]
    return out.astype(np.uint8)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_idx_set(
    root: Path, folder: str, prefix: dict[str, str], classes: int, n: tuple[int, int], seed=0
) -> Path:
    """``root/<folder>/raw/`` with idx image and label files for train and test."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for part, count in zip(("train", "test"), n, strict=True):
        labels = _labels(count, classes, rng)
        _write_idx(raw / prefix[f"{part}_images"], _gray(labels, rng))
        _write_idx(raw / prefix[f"{part}_labels"], labels.astype(np.uint8))
    return raw


def write_kmnist(root: Path, n: tuple[int, int] = (200, 60)) -> Path:
    names = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    return write_idx_set(root, "KMNIST", names, 10, n)


def write_emnist(root: Path, split: str = "digits", n: tuple[int, int] = (200, 60)) -> Path:
    names = {
        f"{part}_{kind}": f"emnist-{split}-{part}-{suffix}-ubyte"
        for part in ("train", "test")
        for kind, suffix in (("images", "images-idx3"), ("labels", "labels-idx1"))
    }
    return write_idx_set(root, "EMNIST", names, 10, n)


def write_svhn(root: Path, n: tuple[int, int] = (200, 60), seed: int = 0) -> Path:
    """``train_32x32.mat`` / ``test_32x32.mat``: X (32, 32, 3, N) uint8, y (N, 1) with 10 for 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    for part, count in zip(("train", "test"), n, strict=True):
        labels = _labels(count, 10, rng)
        images = make_images(labels, rng)  # (N, 3, 32, 32)
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        savemat(Path(root) / f"{part}_32x32.mat", {"X": np.transpose(images, (2, 3, 1, 0)), "y": y})
    return Path(root)


def write_cifar100(root: Path, n: tuple[int, int] = (300, 100), seed: int = 0) -> Path:
    """``cifar-100-python/``: train, test and meta pickles (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for part, count in zip(("train", "test"), n, strict=True):
        labels = _labels(count, 100, rng)
        images = make_images(labels % 10, rng)
        dump_py2_pickle(
            {
                b"filenames": [f"{part}_{i}.png".encode() for i in range(count)],
                b"batch_label": f"{part} batch".encode(),
                b"fine_labels": [int(v) for v in labels],
                b"coarse_labels": [int(v) // 5 for v in labels],
                b"data": images.reshape(count, 3072),
            },
            folder / part,
        )
    meta = {
        b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)],
    }
    dump_py2_pickle(meta, folder / "meta")
    return folder


def write_stl10(root: Path, n: tuple[int, int] = (100, 40), seed: int = 0) -> Path:
    """``stl10_binary/``: {train,test}_X.bin (N, 3, 96, 96 column-major) and _y.bin (1..10)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for part, count in zip(("train", "test"), n, strict=True):
        labels = _labels(count, 10, rng)
        images = np.repeat(np.repeat(make_images(labels, rng), 3, axis=2), 3, axis=3)  # 96x96
        np.transpose(images, (0, 1, 3, 2)).astype(np.uint8).tofile(folder / f"{part}_X.bin")
        (labels + 1).astype(np.uint8).tofile(folder / f"{part}_y.bin")
    (folder / "class_names.txt").write_text(
        "\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"])
        + "\n"
    )
    return folder


# ---------------------------------------------------------------- image folders

FOLDER_CLASSES = ["cat", "dog", "owl"]


def folder_image(label: int, rng: np.random.Generator, size: tuple[int, int], mode: str):  # noqa: ANN201
    """A Pillow image whose colour and stripes depend on ``label``, at ``size`` in ``mode``."""
    from PIL import Image

    pixels = make_images(np.array([label * 3]), rng)[0].transpose(1, 2, 0)  # 32x32 RGB
    image = Image.fromarray(pixels).resize(size)
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE)
    return image.convert(mode)


def write_image_folder(
    root: Path, per_class: tuple[int, int] = (40, 12), val: int = 0, seed: int = 0, classes=FOLDER_CLASSES
) -> Path:
    """``root/{train,test}[,val]/<class>/`` PNG and JPEG files of mixed sizes and modes."""
    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (40, 36), (28, 28), (64, 48)]
    modes = ["RGB", "L", "P", "RGBA"]
    counts = {"train": per_class[0], "test": per_class[1], **({"val": val} if val else {})}
    for split, count in counts.items():
        for label, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = folder_image(label, rng, sizes[i % len(sizes)], modes[i % len(modes)])
                if i % 5 == 4:
                    image.convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)
                else:
                    image.save(folder / f"{i:04d}.png")
    return Path(root)
