"""Mode ``dynamic`` (onnxruntime ``quantize_dynamic``): int8 weights of the configured op types,
activations quantized on the fly at run time, so no calibration. The accuracy fallback does not
run (one measured try); the latency search may keep any of those nodes in fp32."""

from __future__ import annotations

from pathlib import Path

from compress.quantization import ort
from compress.quantization.job import Job
from compress.quantization.modes.onnxruntime import OnnxParent, OnnxPass


def onnx_pass(job: Job, parent: OnnxParent, work: Path) -> OnnxPass:
    """Dynamic int8 of the pre-processed fp32 file, ``excluded`` nodes left in fp32."""
    settings = parent.settings
    weight_nodes = [n for n, t in parent.nodes if t in settings.dynamic_op_types]

    def make(excluded: list[str], path: Path) -> Path:
        return ort.quantize_onnx_dynamic(parent.pre, path, settings, excluded)

    path_used = (
        f"onnxruntime quantize_dynamic({'/'.join(settings.dynamic_op_types)}, weights {settings.weight_type})"
    )
    return OnnxPass(make, weight_nodes, weight_nodes, path_used)
