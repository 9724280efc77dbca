"""Image folders in torchvision's ImageFolder layout: scanned, checked, decoded once.

Layout: ``ROOT/train/<class>/<image>`` and ``ROOT/test/<class>/<image>``, optionally
``ROOT/val/<class>/<image>`` (without it the seeded train/validation split applies). Class
names are the train folder's sub-folder names in sorted order, as torchvision's ImageFolder
has them; hidden folders (``.ipynb_checkpoints``) are not classes. Images may sit in nested
folders below their class folder. Everything a user can get wrong is found before a run
starts and named with its path: a missing split, one class only, an empty class folder, a test
class train does not have, a file that is not an image, a damaged, 16-bit or CMYK image, a
symlink that leaves the root. OS clutter (``.DS_Store``, ``Thumbs.db``, hidden files) is
skipped and counted.

Decoded images are kept in memory when all splits together fit ``data.memory_limit_mb``, and
cached on disk (keyed by the folder's fingerprint and the image shape), so the next run loads
them in a second; larger folders stream from disk through DataLoader workers.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from compress.data.images import ImageProblem, ImageShape, decoded_batches, open_image
from compress.errors import DataError

log = logging.getLogger("compress")

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLUTTER = {".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db"}
MAX_LISTED = 8  # problems listed in one message; the rest are counted


@dataclass
class FolderScan:
    """What a folder holds: class names and, per split, (file, class index) in a fixed order."""

    root: Path
    classes: list[str]
    items: dict[str, list[tuple[Path, int]]]
    skipped: list[Path] = field(default_factory=list)  # clutter: hidden files, .DS_Store, ...
    stray: list[Path] = field(default_factory=list)  # files beside the class folders

    def files(self) -> list[tuple[str, Path]]:
        """(path relative to the root, path) of every image, for the fingerprint."""
        return [(p.relative_to(self.root).as_posix(), p) for rows in self.items.values() for p, _ in rows]

    def count(self) -> int:
        return sum(len(rows) for rows in self.items.values())


class _Problems:
    """Collects what is wrong, so one message can name every bad file (up to MAX_LISTED)."""

    def __init__(self, root: Path):
        self.root, self.found = root, []

    def add(self, path: Path, message: str) -> None:
        self.found.append(f"{path}: {message}")

    def raise_if_any(self) -> None:
        if not self.found:
            return
        if len(self.found) == 1:
            raise DataError(self.found[0])
        shown = self.found[:MAX_LISTED]
        more = f"\n  ... and {len(self.found) - MAX_LISTED} more" if len(self.found) > MAX_LISTED else ""
        raise DataError(
            f"{self.root}: {len(self.found)} problems in the image folder\n  - " + "\n  - ".join(shown) + more
        )


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in CLUTTER


def scan(root: Path) -> FolderScan:
    """The folder's classes and images, in sorted order; DataError naming every problem."""
    root = Path(root)
    real_root = root.resolve()
    layout = f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> (val/ optional)"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            present = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else []
            raise DataError(
                f"{root}: not an image folder: there is no {split}/ directory ({layout}; found: "
                f"{', '.join(present) or 'nothing'})"
            )
    train = root / "train"
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not _hidden(p.name))
    if not classes:
        raise DataError(f"{train}: no class folders ({layout})")
    if len(classes) == 1:
        raise DataError(
            f"{train}: only one class folder ({classes[0]!r}); a classifier needs at least two classes"
        )
    problems = _Problems(root)
    result = FolderScan(root, classes, {})
    index = {name: i for i, name in enumerate(classes)}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        rows: list[tuple[Path, int]] = []
        for entry in sorted(folder.iterdir()):
            if _hidden(entry.name):
                result.skipped.append(entry)
            elif not entry.is_dir():
                result.stray.append(entry)
            elif entry.name not in index:
                problems.add(
                    entry, f"class {entry.name!r} is not in train/ (train's classes: {', '.join(classes)})"
                )
            elif _outside(entry, real_root):
                problems.add(entry, f"a symlink to {entry.resolve()}, outside the data root {real_root}")
            else:
                images = _images(entry, real_root, problems, result.skipped)
                if not images:
                    problems.add(entry, "empty class folder: no image files in it; add images or remove it")
                rows += [(path, index[entry.name]) for path in images]
        result.items[split] = rows
    problems.raise_if_any()
    _log_scan(result)
    return result


def _outside(path: Path, real_root: Path) -> bool:
    return not path.resolve().is_relative_to(real_root)


def _images(folder: Path, real_root: Path, problems: _Problems, skipped: list[Path]) -> list[Path]:
    """The image files under one class folder (nested folders included), sorted by path."""
    found: list[Path] = []
    seen: set[Path] = set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        here = Path(current)
        real = here.resolve()
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        for name in list(dirs):
            if _hidden(name) or _outside(here / name, real_root):
                dirs.remove(name)
                if _hidden(name):
                    skipped.append(here / name)
                else:
                    problems.add(
                        here / name, f"a symlink to {(here / name).resolve()}, outside the data root"
                    )
        for name in files:
            path = here / name
            if _hidden(name):
                skipped.append(path)
            elif _outside(path, real_root):
                problems.add(path, f"a symlink to {path.resolve()}, outside the data root {real_root}")
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                problems.add(
                    path,
                    f"not an image file (extension {path.suffix or 'none'!r}); remove it or move it out of "
                    f"the class folder (images: {', '.join(IMAGE_EXTENSIONS)})",
                )
            else:
                found.append(path)
    return sorted(found)


def _log_scan(result: FolderScan) -> None:
    counts = ", ".join(f"{split} {len(rows)}" for split, rows in result.items.items())
    log.info("data: image folder %s: %d classes, %s images", result.root, len(result.classes), counts)
    if result.skipped:
        log.info("data: skipped %d hidden or system files (e.g. %s)", len(result.skipped), result.skipped[0])
    if result.stray:
        log.warning(
            "data: ignored %d file(s) outside the class folders (e.g. %s)", len(result.stray), result.stray[0]
        )
    labels = {split: Counter(c for _, c in rows) for split, rows in result.items.items()}
    absent = [result.classes[i] for i in range(len(result.classes)) if not labels.get("test", {}).get(i)]
    if absent:
        log.warning(
            "data: no test images for class(es) %s: their accuracy is not measured", ", ".join(absent)
        )


# ------------------------------------------------------------------ checking and decoding


def check_headers(scan_: FolderScan, requested_size: int | None) -> int:
    """Open every image's header (mode and size); the square side the images will have."""
    problems = _Problems(scan_.root)
    sizes: dict[tuple[int, int], Path] = {}
    rows = [p for items in scan_.items.values() for p, _ in items]
    for path in tqdm(rows, desc="checking images", leave=False, mininterval=1.0, disable=len(rows) < 5000):
        try:
            image = open_image(path)
        except ImageProblem as exc:
            problems.add(path, str(exc))
            continue
        sizes.setdefault(image.size, path)  # type: ignore[attr-defined]
        image.close()  # type: ignore[attr-defined]
    problems.raise_if_any()
    if requested_size is not None:
        return requested_size
    (width, height), example = next(iter(sizes.items()))
    if len(sizes) > 1 or width != height:
        shown = "; ".join(f"{p.relative_to(scan_.root)} is {w}x{h}" for (w, h), p in list(sizes.items())[:3])
        raise DataError(
            f"{scan_.root}: the images are not all one square size ({shown}); set data.image_size "
            "(e.g. 32 or 224): each image is resized on its shorter side and center-cropped to it"
        )
    return width


def decode_all(scan_: FolderScan, shape: ImageShape, side: int, workers: int) -> dict[str, torch.Tensor]:
    """Every split decoded into uint8 tensors: {"<split>_x": (N, C, S, S), "<split>_y": (N,)}."""
    from torchvision.transforms.v2 import functional  # noqa: F401 - imported once, before workers fork

    problems = _Problems(scan_.root)
    blank = (shape.channels, side, side)
    out: dict[str, torch.Tensor] = {}
    total = scan_.count()
    bar = tqdm(total=total, desc="decoding images", leave=False, mininterval=1.0, disable=total < 2000)
    for split, rows in scan_.items.items():
        paths = [p for p, _ in rows]
        pixels = torch.empty((len(paths), *blank), dtype=torch.uint8)
        for batch, index, found in decoded_batches(paths, shape, blank, range(len(paths)), 256, workers):
            pixels[index] = batch
            for problem in found:
                problems.found.append(problem)
            bar.update(len(index))
        out[f"{split}_x"] = pixels
        out[f"{split}_y"] = torch.tensor([c for _, c in rows], dtype=torch.long)
    bar.close()
    problems.raise_if_any()
    return out
