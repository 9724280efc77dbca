"""The reference file ``python -m compress.check`` compares with: one JSON file, rows and predictions.

    {"format": "compress.check reference", "version": 1,
     "test_set": {"images": 10000, "classes": ["0", ...], "fingerprint": "...",
                  "dtype": "uint8", "encoding": "zlib-base64", "labels": "<text>"},
     "rows": [{"variant": "baseline", "runtime": "onnxruntime", "accuracy": 0.939, ...,
               "predictions": "<text>"}, ...]}

The labels are one small integer per test image (uint8 up to 256 classes, else little-endian
uint16/int32), zlib-compressed and base64-encoded; the class names and data fingerprint are
stored once. Each row's top-1 predictions are stored the same way as ``(prediction - label) mod
classes``: 0 wherever the row is right, so a 95 % accurate row of 10,000 images takes ~1,200
characters instead of 13,336. A reference without ``test_set`` (or an older file: a bare JSON
list of rows) holds no predictions; it still compares accuracies, sizes and latencies.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from typing import Any

import numpy as np

from compress.gating.numbers import Row
from compress.results import Predictions, row_key

FORMAT = "compress.check reference"
VERSION = 1
_DTYPES = {"uint8": "u1", "uint16": "<u2", "int32": "<i4"}
ENCODING = "zlib-base64"


def is_reference(data: Any) -> bool:
    """A JSON value written by :func:`build` (any version), as opposed to a bare results table."""
    return isinstance(data, dict) and data.get("format") == FORMAT


def _dtype_name(num_classes: int) -> str:
    return "uint8" if num_classes <= 256 else "uint16" if num_classes <= 65536 else "int32"


def encode(values: np.ndarray, dtype: str) -> str:
    raw = np.asarray(values).astype(_DTYPES[dtype]).tobytes()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def decode(text: Any, dtype: str, images: int, what: str) -> np.ndarray:
    """ValueError naming ``what`` unless ``text`` is an encoded array of ``images`` ``dtype`` values."""
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a base64 string")
    item = np.dtype(_DTYPES[dtype])
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
        inflate = zlib.decompressobj()
        raw = inflate.decompress(packed, images * item.itemsize + 1)  # no more than the test set holds
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what} is not valid base64") from None
    except zlib.error:
        raise ValueError(f"{what} is not zlib data") from None
    if len(raw) != images * item.itemsize or not inflate.eof:
        raise ValueError(f"{what} does not hold the test set's {images} images")
    return np.frombuffer(raw, dtype=item).astype(np.int64)


def build(rows: list[Row], predictions: Predictions | None) -> dict[str, Any]:
    """The reference file's JSON: ``rows`` (already trimmed and sorted), each with its
    predictions when ``predictions`` has them, and the test set once."""
    written: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if predictions is None:
        written["rows"] = rows
        return written
    dtype = _dtype_name(len(predictions.classes))
    written["test_set"] = {
        "images": int(len(predictions.labels)),
        "classes": list(predictions.classes),
        "fingerprint": predictions.fingerprint,
        "dtype": dtype,
        "encoding": ENCODING,
        "labels": encode(predictions.labels, dtype),
    }
    labels, size = np.asarray(predictions.labels, np.int64), max(len(predictions.classes), 1)
    out = []
    for row in rows:
        found = predictions.get(str(row["variant"]), str(row["runtime"]))
        if found is None:
            out.append(dict(row))
        else:
            out.append({**row, "predictions": encode((np.asarray(found, np.int64) - labels) % size, dtype)})
    written["rows"] = out
    return written


def read(data: Any) -> tuple[Any, Predictions | None]:
    """The rows (unchecked: the caller checks the table) and the predictions of a reference file
    or a bare results table. ValueError with a one-line reason if the predictions are unreadable."""
    if not is_reference(data):
        return data, None
    version = data.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(f"reference version {version!r}; this compress reads up to {VERSION}, upgrade it")
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise ValueError("reference file has no list of 'rows'")
    test_set = data.get("test_set")
    if test_set is None:
        return rows, None
    found = _test_set(test_set)
    labels, size = np.asarray(found.labels, np.int64), max(len(found.classes), 1)
    stripped = []
    for index, row in enumerate(rows):
        if isinstance(row, dict) and "predictions" in row:
            row = dict(row)
            text = row.pop("predictions")
            what = f"row {index} ({row.get('variant')} [{row.get('runtime')}]) predictions"
            values = (decode(text, test_set["dtype"], len(labels), what) + labels) % size
            found.rows[row_key(str(row.get("variant")), str(row.get("runtime")))] = values
        stripped.append(row)
    return stripped, found


def _test_set(test_set: Any) -> Predictions:
    if not isinstance(test_set, dict):
        raise ValueError("reference 'test_set' is not an object")
    images, classes, dtype = test_set.get("images"), test_set.get("classes"), test_set.get("dtype")
    if not isinstance(images, int) or images < 0:
        raise ValueError(f"reference test_set.images is not a count: {images!r}")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError("reference test_set.classes is not a list of class names")
    if dtype not in _DTYPES:
        raise ValueError(f"reference test_set.dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if test_set.get("encoding") != ENCODING:
        raise ValueError(f"reference test_set.encoding {test_set.get('encoding')!r} is not {ENCODING!r}")
    labels = decode(test_set.get("labels"), dtype, images, "reference test_set.labels")
    return Predictions(labels=labels, classes=classes, fingerprint=str(test_set.get("fingerprint") or ""))
