"""The results table: one row per (variant, runtime), the one thing every view reads.

The benchmark stage makes it and declares it as its output (``StageResult.table``); the gates
and the report read it from there (``ctx.results[label].table``), and ``python -m
compress.check`` reads the same files back from ``reports/<pipeline>/``. A report made without a
benchmark writes one from the variants' own metrics, with the same columns. So the columns are
listed once, here (:func:`columns`), and so is how the table is written and read:

- ``results.json``: the rows, as pandas writes them (``orient="records"``: NaN as null, floats
  to 10 significant digits), which is what every reader sees;
- ``results.csv``: the same rows; the dict cells (``per_class_accuracy``, ``class_drop_pp``) as
  JSON text;
- ``predictions.npz`` beside them, when the table kept its rows' top-1 predictions
  (:class:`Predictions`), so paired figures (flips, intervals) can be redone later.

All three are written atomically. Reading runs no code: plain JSON and ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.fileio import read_json, write_bytes, write_text

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
PREDICTIONS_FILE = "predictions.npz"
JSON_CELLS = ("per_class_accuracy", "class_drop_pp")  # dicts: JSON text in a CSV cell

Row = dict[str, Any]


def columns(batch_sizes: Iterable[int] = ()) -> list[str]:
    """The table's columns, in order, with the latency group of each timed batch size
    (docs/stages/benchmark.md says what each one holds)."""
    cols = [
        "variant",
        "runtime",
        "format",
        "parent",
        "stage",
        "is_baseline",
        "status",
        "error",
        "file",
        "accuracy",
        "accuracy_delta_pp",
        *("accuracy_drop_ci_low_pp", "accuracy_drop_ci_high_pp"),  # paired: see measure.paired
        "correct",
        "test_count",
        "per_class_min_accuracy",
        "per_class_accuracy",
        *("flip_rate", "flips_fixed", "flips_broken", "worst_class", "worst_class_drop_pp"),
        *("worst_class_drop_ci_low_pp", "worst_class_drop_ci_high_pp", "class_drop_pp", "paired_confidence"),
        "top1_agreement_pytorch",
        "size_bytes",
        "gzip_bytes",
        "size_ratio",
        "gzip_ratio",
        "parameters",
        "nonzero_parameters",
        "sparsity",
        "parameters_ratio",
        "macs",
        "nonzero_macs",
        "macs_ratio",
        "counts_from",
    ]
    for b in batch_sizes:
        cols += [
            f"latency_b{b}_p50_ms",
            f"latency_b{b}_p95_ms",
            f"latency_b{b}_spread_pct",
            f"latency_b{b}_repeats",
            f"throughput_b{b}",
            f"latency_ratio_b{b}",
        ]
    cols += [
        "threads",
        "cpu_model",
        "torch_version",
        "onnxruntime_version",
        "runtime_version",
        "export_ok",
        "parity_max_abs_diff",
        "parity_top1_agreement",
    ]
    return cols


# what a committed reference keeps of each row (``compress.check --update-baseline``), besides
# every batch size's median and p95 latency: what the check compares, and what names the row
REFERENCE_COLUMNS = (
    "variant",
    "runtime",
    "format",
    "parent",
    "status",
    "error",
    "accuracy",
    "accuracy_delta_pp",
    "correct",
    "test_count",
    "per_class_accuracy",
    "size_bytes",
    "gzip_bytes",
    "size_ratio",
    "gzip_ratio",
    "parameters",
    "nonzero_parameters",
    "sparsity",
    "macs",
    "threads",
    "cpu_model",
    "torch_version",
    "onnxruntime_version",
    "export_ok",
)


class TableError(ValueError):
    """Not a results table; the message says why in one line (without the file's name)."""


@dataclass
class ResultsTable:
    """The rows, the columns they are written with, and the rows' kept predictions (if any)."""

    rows: list[Row]
    columns: list[str]
    predictions: Predictions | None = None

    @classmethod
    def of(cls, rows: list[Row], predictions: Predictions | None = None) -> ResultsTable:
        """A table of the columns its rows fill, in the table's order (a report's table made
        from the variants' own metrics has no latency or paired columns)."""
        present = {key for row in rows for key in row}
        order = [c for c in columns() if c in present]
        order += [key for key in dict.fromkeys(k for row in rows for k in row) if key not in order]
        return cls([{c: row[c] for c in order if c in row} for row in rows], order, predictions)

    def only(self, variants: Iterable[str]) -> list[Row]:
        """The rows of these variants, in table order."""
        names = set(variants)
        return [row for row in self.rows if row.get("variant") in names]

    def without(self, variants: Iterable[str]) -> list[Row]:
        """The rows of every other variant, in table order."""
        names = set(variants)
        return [row for row in self.rows if row.get("variant") not in names]

    def save(self, directory: Path) -> dict[str, str]:
        """results.json, results.csv and (when kept) predictions.npz in ``directory``, each
        written atomically; returns them as a stage's ``publish`` map (same names)."""
        import pandas as pd  # here, not at the top: every CLI run imports the stages (0.5 s)

        frame = pd.DataFrame(self.rows).reindex(columns=self.columns)
        csv_frame = frame.copy()
        for column in (c for c in JSON_CELLS if c in csv_frame):
            csv_frame[column] = csv_frame[column].map(lambda v: json.dumps(v) if isinstance(v, dict) else v)
        written = [RESULTS_CSV, RESULTS_JSON]
        write_text(directory / RESULTS_CSV, csv_frame.to_csv(index=False))
        write_text(directory / RESULTS_JSON, frame.to_json(orient="records", indent=2) + "\n")
        if self.predictions is not None:
            self.predictions.save(directory / PREDICTIONS_FILE)
            written.append(PREDICTIONS_FILE)
        return {name: name for name in written}

    @classmethod
    def from_json(cls, data: Any, predictions: Predictions | None = None) -> ResultsTable:
        """The table in a parsed results.json; TableError unless it is a list of rows, each
        naming its variant and runtime once, with numbers where numbers belong."""
        if not isinstance(data, list):
            raise TableError(
                f"expected a benchmark results table (a JSON list of rows), got a JSON {_kind(data)}"
            )
        _check_rows(data)
        return cls(data, list(dict.fromkeys(key for row in data for key in row)), predictions)

    @classmethod
    def load(cls, path: Path) -> ResultsTable:
        """The table in the results.json at ``path`` (its predictions: :func:`predictions_beside`);
        TableError naming the file if it is missing, not JSON or not a table."""
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise TableError(f"{path}: no such results table") from None
        except (OSError, ValueError) as exc:
            raise TableError(f"{path} is not valid JSON ({exc})") from None
        try:
            return cls.from_json(data)
        except TableError as exc:
            raise TableError(f"{path}: {exc}") from None


def predictions_beside(results: Path) -> Predictions | None:
    """The predictions.npz beside a results.json; None when there is none, ValueError naming
    the file when it is unreadable."""
    beside = Path(results).parent / PREDICTIONS_FILE
    return load_predictions(beside) if beside.is_file() else None


def _check_rows(data: list[Any]) -> None:
    seen: set[tuple[str, str]] = set()
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise TableError(f"row {index} is a JSON {_kind(row)}, not an object")
        for key in ("variant", "runtime"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise TableError(f"row {index} has no {key!r} name; is this a benchmark results.json?")
        for key in ("accuracy", "size_bytes"):
            if row.get(key) is not None and not _finite(row[key]):
                raise TableError(f"row {index} ({row['variant']}): {key} is not a number: {row[key]!r}")
        pair = (row["variant"], row["runtime"])
        if pair in seen:
            raise TableError(f"{pair[0]} [{pair[1]}] appears twice")
        seen.add(pair)


def _finite(value: Any) -> bool:
    """A cell the gates can read as a number (``gating.number`` is not None)."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), "number")


# ---------------------------------------------------------------- the kept predictions
# One file per table (``predictions.npz``): the labels, the class names, the data fingerprint,
# and one small-integer array per (variant, runtime) in test-split order. 10,000 images x 14
# rows is ~140 KB as uint8.

_LABELS, _CLASSES, _FINGERPRINT = "_labels", "_classes", "_fingerprint"


def row_key(variant: str, runtime: str) -> str:
    return f"{variant}@{runtime}"


def _dtype(num_classes: int) -> type:
    return np.uint8 if num_classes <= 256 else np.uint16 if num_classes <= 65536 else np.int32


@dataclass
class Predictions:
    """The labels and every row's top-1 predictions of one table (same images, same order)."""

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


def load_predictions(path: Path) -> Predictions:
    """ValueError naming the file if it is not a predictions file. Plain arrays only
    (``allow_pickle=False``), so reading one runs no code."""
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
