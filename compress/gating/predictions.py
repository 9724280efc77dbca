"""Each measured row's top-1 predictions on the test split, kept so paired figures can be redone.

One file per benchmark (``predictions.npz``, published beside ``results.json``): the labels,
the class names, the data fingerprint, and one small-integer array per (variant, runtime) in
test-split order. 10,000 images x 14 rows is ~140 KB as uint8. Read with
``allow_pickle=False``: the file holds plain arrays only, so reading it runs no code.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compress.fileio import write_bytes

FILE_NAME = "predictions.npz"
_LABELS, _CLASSES, _FINGERPRINT = "_labels", "_classes", "_fingerprint"


def row_key(variant: str, runtime: str) -> str:
    return f"{variant}@{runtime}"


def _dtype(num_classes: int) -> type:
    return np.uint8 if num_classes <= 256 else np.uint16 if num_classes <= 65536 else np.int32


@dataclass
class Predictions:
    """The labels and every row's predictions of one benchmark (same images, same order)."""

    labels: np.ndarray
    classes: list[str]
    fingerprint: str = ""  # of the data files (data.fingerprint); "" when unknown
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # row_key -> predictions

    def get(self, variant: str, runtime: str) -> np.ndarray | None:
        return self.rows.get(row_key(variant, runtime))

    def add(self, variant: str, runtime: str, predictions: np.ndarray) -> None:
        if len(predictions) != len(self.labels):
            raise ValueError(
                f"{row_key(variant, runtime)}: {len(predictions)} predictions, {len(self.labels)} labels"
            )
        self.rows[row_key(variant, runtime)] = np.asarray(predictions).astype(_dtype(len(self.classes)))

    def save(self, path: Path) -> None:
        """Written atomically (temp file, then rename)."""
        buffer = io.BytesIO()
        arrays = {
            _LABELS: np.asarray(self.labels).astype(_dtype(len(self.classes))),
            _CLASSES: np.array(self.classes, dtype=str),
            _FINGERPRINT: np.array(self.fingerprint, dtype=str),
            **self.rows,
        }
        np.savez_compressed(buffer, **arrays)
        write_bytes(path, buffer.getvalue())


def load(path: Path) -> Predictions:
    """ValueError naming the file if it is not a predictions file."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a lone .npy array
            raise ValueError("not an .npz archive")
        with data:
            found = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable predictions file ({type(exc).__name__}: {exc})") from None
    if _LABELS not in found or _CLASSES not in found:
        raise ValueError(f"{path}: not a predictions file (no labels or class names)")
    return Predictions(
        labels=found.pop(_LABELS),
        classes=[str(c) for c in found.pop(_CLASSES)],
        fingerprint=str(found.pop(_FINGERPRINT, "")),
        rows=found,
    )
