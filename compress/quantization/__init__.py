"""Int8 post-training quantization mechanics, apart from the stage.

The ``quantize`` stage (``compress/stages/quantize.py``) decides *what* to quantize and when a
result is good enough; this package knows *how*: ``ort`` (onnxruntime dynamic/static int8),
``torchao`` (PyTorch int8 through PT2E and ``quantize_``), ``evaluate`` (accuracy and
interleaved latency of candidates) and ``search`` (the accuracy- and latency-aware choice of
what stays in fp32).
"""

from compress.quantization.evaluate import (
    accuracy_of,
    compare_latency,
    file_sizes,
    onnx_accuracy,
    onnx_predictor,
    onnx_runner,
    ort_session,
    torch_runner,
    torch_threads,
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
from compress.quantization.search import Try, accuracy_fallback, drop_pp, latency_search, meets
from compress.quantization.torchao import pt2e_static, save_exported, torch_predictor, torchao_dynamic

__all__ = [
    "DYNAMIC_OP_TYPES",
    "WEIGHT_OP_TYPES",
    "ImageReader",
    "OrtSettings",
    "Try",
    "accuracy_fallback",
    "accuracy_of",
    "compare_latency",
    "drop_pp",
    "file_sizes",
    "graph_nodes",
    "int8_initializers",
    "latency_search",
    "meets",
    "onnx_accuracy",
    "onnx_predictor",
    "onnx_runner",
    "ort_session",
    "prepare_onnx",
    "pt2e_static",
    "quantize_onnx_dynamic",
    "quantize_onnx_static",
    "save_exported",
    "torch_predictor",
    "torch_runner",
    "torch_threads",
    "torchao_dynamic",
]
