"""Run one model file in a fresh, isolated Python process with only its runtime and numpy.

The child is ``python -I -c SOURCE``: no user site, no PYTHONPATH, and an import hook that
refuses torch, torchvision, onnx and compress (a target may allow what its runtime's own
binding needs), so a file that secretly depends on our code or on PyTorch fails loudly
instead of passing on a machine that happens to have them. SOURCE is the runner module's
own text (``runners/<name>.py``) followed by the comparison below, so the verify child and
the benchmark run the same loader. Standard library only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from compress.ship.targets.registry import Target

BLOCKED = ("torch", "torchvision", "onnx", "compress")
TIMEOUT_S = 300

_GUARD = r"""
import importlib.abc
import importlib.machinery
import sys

BLOCKED = set(%r)


class _Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # A blocked module is found (a library probing with find_spec gets an answer, as
    # torch._dynamo does) but cannot be imported.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError("the verify child may not import " + spec.name)

    def exec_module(self, module):
        raise ImportError("the verify child may not import " + module.__name__)


sys.meta_path.insert(0, _Refuse())
"""

_COMPARE = r"""
import json as _json


def _first_line(exc):
    text = str(exc).strip()
    return type(exc).__name__ + ": " + (text.splitlines()[0][:300] if text else "")


def _compare(model, sample, expected, threads):
    try:
        run = load(model, threads)
    except Exception as exc:
        return {"ok": False, "kind": "not_loadable", "error": _first_line(exc)}
    try:
        x = np.load(sample, allow_pickle=False)
        want = np.load(expected, allow_pickle=False)
        got = run(x)
    except Exception as exc:
        return {"ok": False, "kind": "run_failed", "error": _first_line(exc)}
    if got.shape != want.shape:
        error = "output shape %s, expected %s" % (got.shape, want.shape)
        return {"ok": False, "kind": "mismatch", "error": error}
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
    same = int(np.sum(got.argmax(1) == want.argmax(1)))
    return {"ok": True, "kind": None, "error": None, "max_abs_diff": diff, "top1_same": same,
            "count": int(len(want)), "finite": bool(np.isfinite(got).all()),
            "top1": [int(i) for i in got.argmax(1)]}


_result = _compare(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
try:
    _result["runtime_version"] = str(version())
except Exception as exc:
    _result["runtime_version"] = "unknown (" + _first_line(exc) + ")"
_result["modules"] = sorted({name.split(".")[0] for name in sys.modules})
print(_json.dumps(_result))
"""


def program(target: Target) -> str:
    blocked = sorted(set(BLOCKED) - set(target.child_allows))
    runner = (Path(__file__).parent / "runners" / f"{target.runner}.py").read_text(encoding="utf-8")
    return (_GUARD % (blocked,)) + "\n" + runner + "\n" + _COMPARE


def forbidden_modules(target: Target, modules: list[str]) -> set[str]:
    return (set(BLOCKED) - set(target.child_allows)) & set(modules)


def compare(
    target: Target, model: Path, sample: Path, expected: Path, threads: int = 1, timeout: float = TIMEOUT_S
) -> dict[str, Any]:
    """Logits of ``model`` on ``sample`` against ``expected``: max |diff|, top-1 agreement.

    Never raises for a bad file: the result's ``kind`` says not_loadable / run_failed /
    mismatch (shape) with ``error``; ``ok`` means the comparison ran, not that it passed.
    """
    # absolute: the child runs in the model's folder
    model, sample, expected = (Path(p).resolve() for p in (model, sample, expected))
    command = [
        sys.executable,
        "-I",
        "-c",
        program(target),
        str(model),
        str(sample),
        str(expected),
        str(threads),
    ]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=Path(model).parent
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "kind": "run_failed", "error": f"timed out after {timeout:.0f}s"}
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "kind": "run_failed", "error": f"child exited {proc.returncode}: {tail[:300]}"}
    forbidden = forbidden_modules(target, result.get("modules", []))
    if forbidden:
        return {**result, "ok": False, "kind": "run_failed", "error": f"child imported {sorted(forbidden)}"}
    return result
