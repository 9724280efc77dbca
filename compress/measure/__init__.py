"""The one place that measures, so every number in a report is taken the same way.

By job:

- ``accuracy``: a model scored on one split (loss, top-1, per class); accuracy from predictions;
- ``paired``: a variant against its reference on the same test images (the drop's interval,
  flips, each class) and the benchmark table's paired columns;
- ``rules``: the one tolerance rule (the drop in pp, and whether it is within a limit);
- ``latency``: the interleaved timer, threads, the onnxruntime session, the fixed input, the CPU;
- ``size``: bytes on disk and gzip-compressed, parameters and non-zero parameters;
- ``macs``: multiply-accumulates per image, and the hooked forward pass that observes layers.

The public names are loaded on first use (``from compress.measure import time_interleaved``):
``rules`` and ``paired`` need no torch, so the gates and ``compress.check``, which use them,
stay as cheap to import as they are without the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "accuracy": (
        "EVAL_BATCH",
        "accuracy_from_predictions",
        "accuracy_of",
        "evaluate",
        "onnx_accuracy",
        "onnx_predictor",
    ),
    "latency": (
        "Latency",
        "cpu_model",
        "fixed_inputs",
        "int8_saturates",
        "ort_session",
        "resolve_threads",
        "time_interleaved",
        "time_latency",
        "torch_threads",
    ),
    "macs": ("MacCount", "count_macs", "run_hooked"),
    "rules": ("drop_pp", "excess", "within", "within_tolerance"),
    "size": (
        "GZIP_LEVEL",
        "count_nonzero_parameters",
        "count_parameters",
        "file_size",
        "file_sizes",
        "gzip_bytes",
        "gzip_size",
        "onnx_initializer_counts",
    ),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
