"""``python -m compress.verify DEPLOY_DIR``: check a deploy bundle the way an edge team would.

1. Every file listed in ``SHA256SUMS`` exists and has that checksum (a tampered or truncated
   file fails, named in the table).
2. Every model listed in ``bundle.json`` is run in a fresh Python process that can import only
   numpy and onnxruntime (torch, onnx and compress are blocked there), on ``sample_input.npy``;
   its logits must match ``<variant>.expected.npy`` within the bundle's tolerance and give the
   same top-1 class.

Exit codes: 0 everything matches; 1 a check failed (a per-file table says which);
2 the folder is not a deploy bundle, or a model whose checksum matches is not ONNX at all.

This module imports only the standard library so it starts fast and never drags in torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLE_FORMAT = "compress.deploy/1"
INDEX = "bundle.json"
SUMS = "SHA256SUMS"
EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2
CHILD_TIMEOUT_S = 300

# Runs in the child with ``python -I -c``. It may import only the standard library, numpy and
# onnxruntime; an import hook refuses torch, onnx and compress so a hidden dependency on them
# fails loudly instead of passing on a machine that happens to have them installed.
CHILD_SOURCE = r"""
import sys

BLOCKED = {"torch", "torchvision", "onnx", "compress"}


class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("the verify child may not import " + name)
        return None


sys.meta_path.insert(0, _Refuse())

import json

import numpy as np
import onnxruntime as ort


def first_line(exc):
    text = str(exc).strip()
    return type(exc).__name__ + ": " + (text.splitlines()[0][:300] if text else "")


def check(model, sample, expected, atol):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return {"ok": False, "kind": "not_onnx", "error": first_line(exc)}
    try:
        x = np.load(sample, allow_pickle=False)
        want = np.load(expected, allow_pickle=False)
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as exc:
        return {"ok": False, "kind": "run_failed", "error": first_line(exc)}
    if got.shape != want.shape:
        error = "output shape %s, expected %s" % (got.shape, want.shape)
        return {"ok": False, "kind": "mismatch", "error": error}
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
    same = int(np.sum(got.argmax(1) == want.argmax(1)))
    ok = bool(np.isfinite(diff) and diff <= atol and same == len(want))
    error = None if ok else "max |diff| %.3g (tolerance %.3g), top-1 %d/%d" % (diff, atol, same, len(want))
    return {"ok": ok, "kind": None if ok else "mismatch", "error": error,
            "max_abs_diff": diff, "top1_same": same, "count": int(len(want))}


result = check(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
result["modules"] = sorted({name.split(".")[0] for name in sys.modules})
result["onnxruntime"] = ort.__version__
print(json.dumps(result))
"""


class NotABundle(Exception):
    """The directory is not a deploy bundle (exit 2)."""


@dataclass
class Row:
    file: str
    checksum: str  # ok | MISMATCH | MISSING | unlisted | -
    outputs: str = "-"  # ok | MISMATCH | ERROR | NOT ONNX | -
    max_abs_diff: float | None = None
    top1: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.checksum in ("ok", "-") and self.outputs in ("ok", "-")


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


def run_child(
    model: Path, sample: Path, expected: Path, atol: float, timeout: float = CHILD_TIMEOUT_S
) -> dict[str, Any]:
    """Run one model in a fresh isolated interpreter (``-I``: no user site, no PYTHONPATH)."""
    command = [sys.executable, "-I", "-c", CHILD_SOURCE, str(model), str(sample), str(expected), repr(atol)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=model.parent)
    except subprocess.TimeoutExpired:
        return {"ok": False, "kind": "run_failed", "error": f"timed out after {timeout:.0f}s"}
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "kind": "run_failed", "error": f"child exited {proc.returncode}: {tail[:300]}"}


def verify(directory: Path, timeout: float = CHILD_TIMEOUT_S) -> tuple[int, list[Row], list[str]]:
    """(exit code, per-file rows, messages). Raises NotABundle for exit-2 situations."""
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
    not_onnx: list[str] = []
    for model in index["models"]:
        name = str(model.get("file", ""))
        row = rows.setdefault(name, Row(name, "unlisted", detail=f"not listed in {SUMS}"))
        expected = directory / str(model.get("expected", ""))
        if not (directory / name).is_file() or not expected.is_file() or not sample.is_file():
            row.outputs = "ERROR"
            row.detail = row.detail or "model, expected output or sample input is missing"
            continue
        result = run_child(
            (directory / name).resolve(),
            sample.resolve(),
            expected.resolve(),
            float(model.get("atol", 1e-4)),
            timeout,
        )
        forbidden = {"torch", "torchvision", "onnx", "compress"} & set(result.get("modules", []))
        if forbidden:
            result = {**result, "ok": False, "kind": "run_failed", "error": f"child imported {forbidden}"}
        row.max_abs_diff = result.get("max_abs_diff")
        if "count" in result:
            row.top1 = f"{result['top1_same']}/{result['count']}"
        if result.get("ok"):
            row.outputs = "ok"
            continue
        kind = result.get("kind")
        row.outputs = {"not_onnx": "NOT ONNX", "mismatch": "MISMATCH"}.get(kind, "ERROR")
        row.detail = "; ".join(d for d in (row.detail, str(result.get("error") or "")) if d)
        if kind == "not_onnx" and row.checksum == "ok":
            not_onnx.append(f"{name}: not an ONNX model onnxruntime can load ({result.get('error')})")

    table = list(rows.values())
    if not_onnx:
        raise NotABundle("; ".join(not_onnx))
    failed = bool(malformed) or any(not r.ok for r in table) or INDEX not in sums
    return (EXIT_MISMATCH if failed else EXIT_OK), table, messages


def format_table(rows: list[Row]) -> str:
    width = max([len(r.file) for r in rows] + [4])
    lines = [f"{'file':<{width}}  {'sha256':<8}  {'outputs':<8}  {'max|diff|':>9}  {'top-1':>7}  detail"]
    for r in rows:
        diff = f"{r.max_abs_diff:.2e}" if r.max_abs_diff is not None else "-"
        lines.append(
            f"{r.file:<{width}}  {r.checksum:<8}  {r.outputs:<8}  {diff:>9}  {r.top1 or '-':>7}  {r.detail}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compress.verify",
        description="Check a deploy bundle: checksums, then each model in a fresh numpy+onnxruntime process.",
        epilog="Exit codes: 0 all match, 1 a file failed (see the table), 2 not a deploy bundle.",
    )
    parser.add_argument("deploy_dir", type=Path, help="the deploy folder (…/stages/export/deploy)")
    parser.add_argument(
        "--timeout", type=float, default=CHILD_TIMEOUT_S, help="seconds allowed per model (default 300)"
    )
    args = parser.parse_args(argv)
    try:
        code, rows, messages = verify(args.deploy_dir, args.timeout)
    except NotABundle as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(rows))
    for message in messages:
        print(message)
    models = sum(r.outputs != "-" for r in rows)
    if code == EXIT_OK:
        print(f"verify: OK: {len(rows)} files match {SUMS}, {models} models reproduce their expected outputs")
    else:
        bad = ", ".join(r.file for r in rows if not r.ok) or SUMS
        print(f"verify: FAILED: {bad}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
