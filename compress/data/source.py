"""Finding and checking a pipeline's data before a run starts, and what the cache keys on.

``prepare`` runs before the run directory is made: a missing dataset, an image folder with a
bad file or a data root without the data fails at once, with nothing written, even when
every stage would be a cache hit. It returns a ``DataSource``: where the files are and their
fingerprint (``data.fingerprint``), plus, for an image folder that fits in memory, its images
decoded once (also cached on disk by fingerprint and image shape, so the next run need not
decode them again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.config import DataConfig
from compress.data import builtin, folder
from compress.data.fingerprint import fingerprint
from compress.data.images import ImageShape
from compress.data.root import cache_dir
from compress.errors import DataError
from compress.fileio import atomic_path, read_json, sha256_json, write_json

log = logging.getLogger("compress")
DECODED_FORMAT = "compress.images/1"
DEFAULT_ROOT_LABEL = "default cache directory"
_DECODED: dict[str, dict[str, Any]] = {}  # decoded folders already in this process, by cache key


@dataclass
class DataSource:
    """A dataset found and checked, ready to load."""

    spec: DataConfig
    root: Path
    label: str  # where the root came from: --data-root, COMPRESS_DATA_ROOT, data.root, ...
    fingerprint: str
    located: builtin.Located | None = None  # a torchvision dataset
    scan: folder.FolderScan | None = None  # an image folder
    shape: ImageShape | None = None  # an image folder's decoding rule
    side: int | None = None  # an image folder's square side
    decoded: dict[str, Any] | None = None  # an image folder decoded into memory

    def describe(self) -> str:
        return f"{self.spec.dataset} from {self.root} ({self.label}), fingerprint {self.fingerprint[:12]}"


def prepare(spec: DataConfig, root: Path, label: str = "") -> DataSource:
    """Locate and check the data; DataError naming the file and what to do when it is unusable."""
    root = Path(root)
    if spec.dataset != "imagefolder":
        located = builtin.locate(spec, root, label)
        extra = {
            "dataset": spec.dataset,
            "emnist_split": spec.split_name() if spec.dataset == "emnist" else None,
        }
        return DataSource(spec, root, label, fingerprint(located.files, extra), located=located)
    if label == DEFAULT_ROOT_LABEL:
        raise DataError(
            "data.dataset imagefolder needs the folder that holds train/ and test/: give --data-root DIR, "
            "--set data.root=DIR, COMPRESS_DATA_ROOT=DIR or data.root in the pipeline YAML"
        )
    scanned = folder.scan(root)
    # "limits": how limit_train/limit_test choose images (seeded subsets since they stopped taking
    # the first N, which left out whole classes); a change re-runs what read the old choice
    print_ = fingerprint(scanned.files(), {"classes": scanned.classes, "limits": "seeded"})
    shape = ImageShape(spec.image_size, spec.channels or 3)
    key = sha256_json({"fingerprint": print_, "size": shape.size, "channels": shape.channels})
    source = DataSource(spec, root, label, print_, scan=scanned, shape=shape)
    limit = spec.memory_limit_mb * 2**20
    decoded = _DECODED.get(key) or _read_decoded(key, scanned)
    if decoded is not None:
        source.side = int(decoded["tensors"]["train_x"].shape[-1])
        if _needed(scanned, shape, source.side) <= limit:
            source.decoded = _DECODED[key] = decoded
            return source
    marker = _cache_file(key, ".checked.json")
    checked = source.side or _read_marker(marker, scanned)  # decoded before: its headers are fine
    side = checked if checked is not None else folder.check_headers(scanned, spec.image_size)
    source.side = side
    needed = _needed(scanned, shape, side)
    if needed > limit:
        log.info(
            "data: %d images at %dx%dx%d need %.0f MiB, over data.memory_limit_mb=%d: streaming them from "
            "disk with %d worker(s)", scanned.count(), shape.channels, side, side, needed / 2**20,
            spec.memory_limit_mb, spec.workers,
        )  # fmt: skip
        _write_marker(marker, scanned, side)
        return source
    tensors = folder.decode_all(scanned, shape, side, spec.workers)
    decoded = {
        "format": DECODED_FORMAT,
        "classes": scanned.classes,
        "count": scanned.count(),
        "tensors": tensors,
    }
    _write_decoded(key, decoded)
    _DECODED[key] = decoded
    source.decoded = decoded
    return source


def _needed(scanned: folder.FolderScan, shape: ImageShape, side: int) -> int:
    """Bytes of every split decoded as uint8 pixels."""
    return scanned.count() * shape.channels * side * side


# ------------------------------------------------------------------ the decoded-images cache


def _cache_file(key: str, suffix: str) -> Path:
    return cache_dir() / "images" / f"{key[:32]}{suffix}"


def _read_decoded(key: str, scanned: folder.FolderScan) -> dict[str, Any] | None:
    """The folder decoded by an earlier run, if its file is whole and matches the scan."""
    path = _cache_file(key, ".pt")
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache file is only a slower start
        log.info("data: ignoring unreadable decoded-image cache %s", path)
        return None
    if (
        not isinstance(data, dict)
        or data.get("format") != DECODED_FORMAT
        or data.get("classes") != scanned.classes
        or data.get("count") != scanned.count()
        or not all(isinstance(t, torch.Tensor) for t in data.get("tensors", {}).values())
    ):
        return None
    log.info("data: decoded images from the cache %s", path)
    return data


def _write_decoded(key: str, decoded: dict[str, Any]) -> None:
    path = _cache_file(key, ".pt")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(decoded, tmp)
    except OSError as exc:  # no cache: the next run decodes again
        log.info("data: cannot cache decoded images at %s (%s)", path, exc)


def _read_marker(path: Path, scanned: folder.FolderScan) -> int | None:
    """The side recorded when this exact folder's headers were last checked (streamed folders)."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("count") == scanned.count() and isinstance(data.get("side"), int)
    return data["side"] if ok else None


def _write_marker(path: Path, scanned: folder.FolderScan, side: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"count": scanned.count(), "side": side})
    except OSError:
        pass


def clear() -> None:
    """Forget what this process decoded (tests)."""
    _DECODED.clear()
