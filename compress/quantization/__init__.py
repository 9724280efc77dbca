"""Int8 (and fp16) quantization mechanics, apart from the stage.

The ``quantize`` stage (``compress/stages/quantize.py``) decides *what* to quantize and when a
result is good enough; this package knows *how*: ``ort`` (onnxruntime dynamic/static int8, fp16),
``torchao`` (PyTorch int8 through PT2E and ``quantize_``), ``qat`` (quantization-aware training
with torchao's PT2E flow), ``evaluate`` (accuracy and interleaved latency of candidates),
``search`` (the accuracy- and latency-aware choice of what stays in fp32), ``job`` (what the modes
of one parent share), ``modes`` (one unit per mode, each making its file) and ``finish`` (the one
step that measures a quantized file and builds its record and ``Variant``).
"""

from compress.quantization.evaluate import (
    accuracy_of,
    file_sizes,
    interleaved_ms,
    onnx_accuracy,
    onnx_predictor,
    onnx_runner,
    torch_runner,
)
from compress.quantization.ort import (
    DYNAMIC_OP_TYPES,
    WEIGHT_OP_TYPES,
    ImageReader,
    OrtSettings,
    graph_nodes,
    int8_initializers,
    prepare_onnx,
    quantize_onnx_dynamic,
    quantize_onnx_static,
)
from compress.quantization.search import Try, accuracy_fallback, accuracy_step, latency_search
from compress.quantization.torchao import pt2e_static, save_exported, torch_predictor, torchao_dynamic

__all__ = [
    "DYNAMIC_OP_TYPES",
    "WEIGHT_OP_TYPES",
    "ImageReader",
    "OrtSettings",
    "Try",
    "accuracy_fallback",
    "accuracy_of",
    "accuracy_step",
    "file_sizes",
    "graph_nodes",
    "int8_initializers",
    "interleaved_ms",
    "latency_search",
    "onnx_accuracy",
    "onnx_predictor",
    "onnx_runner",
    "prepare_onnx",
    "pt2e_static",
    "quantize_onnx_dynamic",
    "quantize_onnx_static",
    "save_exported",
    "torch_predictor",
    "torch_runner",
    "torchao_dynamic",
]
