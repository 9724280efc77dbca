"""onnxruntime int8: the shared ONNX export and its pre-processing, ``quantize_dynamic`` and
``quantize_static`` (QDQ) with a calibration reader over training images, and what a file holds.

The op-type lists are kept here so config validation needs no onnxruntime import."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from compress import faults
from compress.fileio import atomic_path
from compress.ship.convert import INPUT_NAME, export_onnx

log = logging.getLogger("compress.quantization")

DYNAMIC_OP_TYPES = (
    "MatMul",
    "Gemm",
    "Conv",
    "Attention",
    "LSTM",
    "Gather",
    "Transpose",
    "EmbedLayerNormalization",
)
WEIGHT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ORT_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
ORT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


class ImageReader:
    """onnxruntime ``CalibrationDataReader`` over a fixed tensor of normalised images.

    It only ever holds the tensor it is given; the stage builds it from
    ``data.calibration_images`` (training images), and tests spy on ``fed``.
    """

    def __init__(self, images: torch.Tensor, batch_size: int = 64, input_name: str = INPUT_NAME):
        self.images = images.cpu().numpy().astype(np.float32)
        self.batch_size = batch_size
        self.input_name = input_name
        self.fed = 0
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.images):
            return None
        batch = self.images[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        self.fed += len(batch)
        faults.checkpoint(f"calibrate:batch{-(-self._start // self.batch_size)}")
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._start = 0

    def __iter__(self) -> ImageReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size


@dataclass
class OrtSettings:
    per_channel: bool = False
    reduce_range: bool = False
    activation_type: str = "uint8"
    weight_type: str = "int8"
    dynamic_op_types: list[str] = field(default_factory=lambda: ["MatMul", "Gemm"])
    calibration_method: str = "minmax"
    percentile: float = 99.999
    calibration_batch: int = 64


def prepare_onnx(
    model: nn.Module, sample: torch.Tensor, fp32_path: Path, pre_path: Path, metadata: dict[str, str]
) -> None:
    """fp32 ONNX (the shared exporter) and its onnxruntime quantization pre-processing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    export_onnx(model, sample, fp32_path, metadata=metadata)
    with atomic_path(pre_path) as tmp, _quiet():
        quant_pre_process(str(fp32_path), str(tmp))


def graph_nodes(path: Path) -> list[tuple[str, str]]:
    """(name, op_type) of every node, in graph order."""
    model = onnx.load(str(path), load_external_data=False)
    return [(n.name, n.op_type) for n in model.graph.node]


def node_kinds(path: Path) -> dict[str, str]:
    """Each node's kind for the latency search: its op type, with convolutions told apart as
    ``Conv/depthwise`` (group > 1) and ``Conv/1x1`` (pointwise), since int8 kernels differ most
    between those on a CPU (depthwise int8 is often slower than fp32), the rest as ``Conv``."""
    model = onnx.load(str(path), load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    kinds: dict[str, str] = {}
    for node in model.graph.node:
        kind = node.op_type
        if kind == "Conv":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            weight = shapes.get(node.input[1], ()) if len(node.input) > 1 else ()
            if int(attrs.get("group", 1)) > 1:
                kind = "Conv/depthwise"
            elif len(weight) == 4 and tuple(weight[2:]) == (1, 1):
                kind = "Conv/1x1"
        kinds[node.name] = kind
    return kinds


def quantize_onnx_dynamic(
    pre_path: Path, out_path: Path, s: OrtSettings, exclude: Sequence[str] = ()
) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(out_path) as tmp, _quiet():
        quantize_dynamic(
            str(pre_path),
            str(tmp),
            op_types_to_quantize=list(s.dynamic_op_types),
            per_channel=s.per_channel,
            reduce_range=s.reduce_range,
            weight_type=getattr(QuantType, ORT_TYPES[s.weight_type]),
            nodes_to_exclude=list(exclude),
            extra_options={"MatMulConstBOnly": True},
        )
    return out_path


def quantize_static(*args: Any, **kwargs: Any) -> Any:
    """onnxruntime's ``quantize_static``; a module-level name so tests can spy on it."""
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    return ort_quantize_static(*args, **kwargs)


def quantize_onnx_static(
    pre_path: Path,
    out_path: Path,
    reader: ImageReader,
    s: OrtSettings,
    exclude: Sequence[str] = (),
    cache_path: Path | None = None,
) -> Path:
    """QDQ static int8; ``cache_path`` keeps the calibrated ranges so retries skip calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    reader.rewind()
    extra: dict[str, Any] = {}
    if s.calibration_method == "percentile":
        extra["CalibPercentile"] = s.percentile
    with atomic_path(out_path) as tmp, _quiet():
        quantize_static(
            str(pre_path),
            str(tmp),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=s.per_channel,
            reduce_range=s.reduce_range,
            activation_type=getattr(QuantType, ORT_TYPES[s.activation_type]),
            weight_type=getattr(QuantType, ORT_TYPES[s.weight_type]),
            nodes_to_exclude=list(exclude),
            calibrate_method=getattr(CalibrationMethod, ORT_CALIBRATION[s.calibration_method]),
            extra_options=extra,
            calibration_cache_path=str(cache_path) if cache_path is not None else None,
        )
    return out_path


def convert_fp16(source: Path, target: Path) -> Path:
    """fp16 weights and compute, fp32 inputs and outputs (one Cast at each end), with
    onnxconverter-common's float16 conversion: the bundle's I/O contract stays float32."""
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    with atomic_path(target) as tmp:
        onnx.save_model(model, str(tmp))
    return target


def int8_initializers(path: Path) -> dict[str, int]:
    """How many initializers (and bytes) are 8-bit integers, 16-bit and 32-bit floats."""
    model = onnx.load(str(path))
    eight = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    counts = {"int8_initializers": 0, "int8_bytes": 0, "float_initializers": 0, "float_bytes": 0}
    counts.update(fp16_initializers=0, fp16_bytes=0)
    for init in model.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        if init.data_type in eight:
            counts["int8_initializers"] += 1
            counts["int8_bytes"] += size
        elif init.data_type == onnx.TensorProto.FLOAT:
            counts["float_initializers"] += 1
            counts["float_bytes"] += 4 * size
        elif init.data_type == onnx.TensorProto.FLOAT16:
            counts["fp16_initializers"] += 1
            counts["fp16_bytes"] += 2 * size
    return counts


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer prints and warns a lot; keep it in the debug log."""
    buffer = io.StringIO()
    quant_logger = logging.getLogger()
    level = quant_logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
        warnings.simplefilter("ignore")
        quant_logger.setLevel(max(level, logging.ERROR))
        try:
            yield
        finally:
            quant_logger.setLevel(level)
    if buffer.getvalue().strip():
        log.debug("onnxruntime quantization output: %s", buffer.getvalue())
