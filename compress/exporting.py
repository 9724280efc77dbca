"""Turning a torch model into the files that ship: ONNX and TorchScript.

One function per format, used by the export stage and by any stage that needs an ONNX
file of its input (the onnxruntime quantizer), so every ONNX file is made the same way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from compress.fileio import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18

log = logging.getLogger(__name__)


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    path: Path,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A single-file ONNX model with a dynamic batch dimension and named input/output."""
    model = model.eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=65536)
    buffer = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(buffer),
        atomic_path(path) as tmp,
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (sample.cpu(),),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
        proto = program.model_proto
        if metadata:
            set_metadata(proto, metadata)
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
    log.debug("onnx export log: %s", buffer.getvalue())
    return path


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def export_torchscript(model: nn.Module, sample: torch.Tensor, path: Path) -> Path:
    """A traced TorchScript file that loads with ``torch.jit.load`` alone."""
    model = model.eval().cpu()
    with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, sample.cpu())
        traced.save(str(tmp))
    return path
