"""A deploy bundle checked the way an edge team would (the command is ``python -m compress.verify``).

1. Every file listed in ``SHA256SUMS`` exists and has that checksum (a tampered or truncated
   file fails, named in the table).
2. Every model file listed in ``bundle.json`` (ONNX, and each edge target: ``.ort``, OpenVINO
   ``.xml``, LiteRT ``.tflite``, ExecuTorch ``.pte``) is run in a fresh Python process that can
   import only numpy and that file's runtime (torch, onnx and compress are blocked there;
   ExecuTorch's Python binding needs torch, so its child may import torch), on
   ``sample_input.npy``; its logits must match the entry's expected file within the bundle's
   tolerance and give the same top-1 class. ``--targets`` limits the check to some runtimes
   (a runtime that is not installed here is an error, with the pip command, unless left out).

Exit codes: 0 everything matches; 1 a check failed (a per-file table says which);
2 the folder is not a deploy bundle, or a model whose checksum matches cannot be loaded by its
runtime at all.

This module imports only the standard library so it starts fast and never drags in torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.ship.targets import child
from compress.ship.targets.registry import TARGETS, install_hint, missing_packages

BUNDLE_FORMAT = "compress.ship.bundle/1"
INDEX = "bundle.json"
SUMS = "SHA256SUMS"
EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2
CHILD_TIMEOUT_S = child.TIMEOUT_S


class NotABundle(Exception):
    """The directory is not a deploy bundle (exit 2)."""


@dataclass
class Row:
    file: str
    checksum: str  # ok | MISMATCH | MISSING | unlisted | -
    outputs: str = "-"  # ok | MISMATCH | ERROR | NOT LOADABLE | SKIPPED | -
    max_abs_diff: float | None = None
    top1: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.checksum in ("ok", "-") and self.outputs in ("ok", "-", "SKIPPED")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_sums(directory: Path) -> tuple[dict[str, str], list[str]]:
    """name -> digest, plus a list of malformed lines."""
    sums: dict[str, str] = {}
    bad: list[str] = []
    text = (directory / SUMS).read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if match is None or "/" in match.group(2) or match.group(2) in (".", ".."):
            bad.append(f"line {number}: {line[:80]!r}")
            continue
        sums[match.group(2)] = match.group(1).lower()
    return sums, bad


def load_index(directory: Path) -> dict[str, Any]:
    try:
        index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotABundle(f"{directory / INDEX}: cannot be read as JSON ({exc})") from None
    if (
        not isinstance(index, dict)
        or index.get("format") != BUNDLE_FORMAT
        or not isinstance(index.get("models"), list)
    ):
        raise NotABundle(f"{directory / INDEX}: not a {BUNDLE_FORMAT} index")
    _plain_name(index.get("sample_input", "sample_input.npy"), directory, "sample_input")
    for number, model in enumerate(index["models"]):
        if not isinstance(model, dict):
            raise NotABundle(f"{directory / INDEX}: models[{number}] is not a mapping")
        for key in ("file", "expected"):
            _plain_name(model.get(key), directory, f"models[{number}].{key}")
        for extra in model.get("files", []):
            _plain_name(extra, directory, f"models[{number}].files")
        if model.get("target", "onnx") not in TARGETS:
            raise NotABundle(
                f"{directory / INDEX}: models[{number}].target: {model.get('target')!r} is not a known "
                f"runtime ({', '.join(TARGETS)}); this bundle may be newer than this compress"
            )
        atol = model.get("atol", 1e-4)
        if isinstance(atol, bool) or not isinstance(atol, int | float) or not 0 <= atol < float("inf"):
            raise NotABundle(f"{directory / INDEX}: models[{number}].atol: {atol!r} is not a tolerance")
    return index


def _plain_name(value: Any, directory: Path, key: str) -> None:
    """Bundle entries are file names inside the bundle: never a path that leads out of it."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
        raise NotABundle(
            f"{directory / INDEX}: {key}: {value!r} is not a file name inside the bundle "
            "(bundle entries may not contain '/' or '..')"
        )


def verify(
    directory: Path, timeout: float = CHILD_TIMEOUT_S, targets: list[str] | None = None
) -> tuple[int, list[Row], list[str]]:
    """(exit code, per-file rows, messages). Raises NotABundle for exit-2 situations.

    ``targets``: check only files for these runtimes (None: every file the index lists).
    """
    directory = Path(directory)
    if not directory.exists():
        raise NotABundle(f"{directory}: does not exist; give the deploy folder written by the export stage")
    if not directory.is_dir():
        raise NotABundle(
            f"{directory}: is a file, not a deploy folder; give the folder that holds {SUMS} and {INDEX}"
        )
    missing = [name for name in (SUMS, INDEX) if not (directory / name).is_file()]
    if missing:
        raise NotABundle(
            f"{directory}: not a deploy bundle (no {' or '.join(missing)}); the export stage writes "
            "one to artifacts/<pipeline>/<run-id>/stages/export/deploy/"
        )
    sums, malformed = read_sums(directory)
    messages = [f"{SUMS}: malformed {line}" for line in malformed]
    rows: dict[str, Row] = {}
    for name, digest in sorted(sums.items()):
        path = directory / name
        if not path.is_file():
            rows[name] = Row(name, "MISSING", detail="listed in SHA256SUMS but not present")
        elif sha256(path) != digest:
            rows[name] = Row(name, "MISMATCH", detail="content changed since the bundle was written")
        else:
            rows[name] = Row(name, "ok")
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != SUMS and path.name not in sums and not path.name.startswith("."):
            messages.append(f"note: {path.name} is not listed in {SUMS} and was not checked")

    index = load_index(directory)
    if INDEX not in sums:
        messages.append(f"{INDEX} is not listed in {SUMS}")
    sample = directory / str(index.get("sample_input", "sample_input.npy"))
    unloadable: list[str] = []
    for model in index["models"]:
        name = str(model.get("file", ""))
        target = TARGETS[model.get("target", "onnx")]
        row = rows.setdefault(name, Row(name, "unlisted", detail=f"not listed in {SUMS}"))
        if targets is not None and target.name not in targets:
            row.outputs, row.detail = "SKIPPED", f"{target.name} not among --targets"
            continue
        absent = missing_packages(target, running_only=True)
        if absent:
            row.outputs = "ERROR"
            row.detail = (
                f"{target.label} is not installed here ({', '.join(absent)}): {install_hint(target)}, "
                f"or leave it out with --targets"
            )
            continue
        expected = directory / str(model.get("expected", ""))
        if not (directory / name).is_file() or not expected.is_file() or not sample.is_file():
            row.outputs = "ERROR"
            row.detail = row.detail or "model, expected output or sample input is missing"
            continue
        result = child.compare(target, directory / name, sample, expected, 1, timeout)
        _judge(row, result, float(model.get("atol", 1e-4)))
        if result.get("kind") == "not_loadable" and row.checksum == "ok":
            unloadable.append(f"{name}: not a model {target.label} can load ({result.get('error')})")

    table = list(rows.values())
    if unloadable:
        raise NotABundle("; ".join(unloadable))
    failed = bool(malformed) or any(not r.ok for r in table) or INDEX not in sums
    return (EXIT_MISMATCH if failed else EXIT_OK), table, messages


def _judge(row: Row, result: dict[str, Any], atol: float) -> None:
    """Fill the row's outputs column from one child comparison."""
    row.max_abs_diff = result.get("max_abs_diff")
    if "count" in result:
        row.top1 = f"{result['top1_same']}/{result['count']}"
    if result.get("ok"):
        diff, same, count = result["max_abs_diff"], result["top1_same"], result["count"]
        if result.get("finite", True) and diff <= atol and same == count:
            row.outputs = "ok"
            return
        result = {
            **result,
            "kind": "mismatch",
            "error": f"max |diff| {diff:.3g} (tolerance {atol:.3g}), top-1 {same}/{count}",
        }
    kind = result.get("kind")
    row.outputs = {"not_loadable": "NOT LOADABLE", "mismatch": "MISMATCH"}.get(kind, "ERROR")
    row.detail = "; ".join(d for d in (row.detail, str(result.get("error") or "")) if d)
