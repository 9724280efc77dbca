"""Mode ``fp16`` (onnxruntime): the parent's fp32 ONNX converted to fp16 weights and compute with
fp32 inputs and outputs, for targets without int8 kernels. It keeps no node in fp32 by name, so
there is nothing for the accuracy fallback or the latency search to choose."""

from __future__ import annotations

from pathlib import Path

from compress.quantization import ort
from compress.quantization.job import Job
from compress.quantization.modes.onnxruntime import OnnxParent, OnnxPass

PATH_USED = "onnxconverter-common convert_float_to_float16 (fp16 weights and compute, fp32 I/O)"


def onnx_pass(job: Job, parent: OnnxParent, work: Path) -> OnnxPass:
    """The fp16 conversion of the fp32 file (not the pre-processed one)."""

    def make(excluded: list[str], path: Path) -> Path:  # ``excluded`` is always empty here
        return ort.convert_fp16(parent.fp32, path)

    return OnnxPass(make, [], [], PATH_USED)
