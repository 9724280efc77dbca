"""One unit per quantize mode, Olive-pass style: each makes its quantized file and says what it
searched; ``finish`` then measures and records every one the same way.

- onnxruntime: ``fp16``, ``dynamic``, ``static`` (post-training passes over the parent's fp32
  ONNX, sharing the searches in ``onnxruntime``) and ``qat`` / ``auto`` (``qat``);
- pytorch (torchao): ``dynamic``, ``static``, ``weight-only`` (``pytorch``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from compress.quantization.finish import Quantized, finish
from compress.quantization.job import Job
from compress.quantization.modes import dynamic, fp16, onnxruntime, pytorch, qat, static
from compress.quantization.modes.onnxruntime import OnnxParent
from compress.variants import Variant

ONNXRUNTIME_MODES: dict[str, Callable[[Job, str, OnnxParent], Quantized]] = {
    "fp16": partial(onnxruntime.quantize, build=fp16.onnx_pass),
    "dynamic": partial(onnxruntime.quantize, build=dynamic.onnx_pass),
    "static": partial(onnxruntime.quantize, build=static.onnx_pass),
    "qat": qat.quantize_aware,
    "auto": qat.quantize_aware,
}


def quantize_parent(job: Job) -> list[tuple[Variant | None, dict[str, Any]]]:
    """Every mode of one parent, in the configured order, each measured and recorded before the
    next starts; the parent's fp32 reference is measured once and shared by all of them."""
    if job.cfg.backend == "onnxruntime":
        onnx_parent = OnnxParent.prepare(job)
        return [
            finish(job, onnx_parent.ref, ONNXRUNTIME_MODES[mode](job, mode, onnx_parent))
            for mode in job.cfg.modes
        ]
    torch_parent = pytorch.TorchParent.prepare(job)
    return [
        finish(job, torch_parent.ref, pytorch.quantize(job, mode, torch_parent)) for mode in job.cfg.modes
    ]
