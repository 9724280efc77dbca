"""LiteRT (TFLite) flatbuffer from the PyTorch model, through litert-torch.

Batch 1, fixed: litert-torch does not convert a flatten with a dynamic batch (tried here on
LeNet-5), and a batch-1 model is what an Android or microcontroller app feeds. fp32 only:
int8 ONNX variants have no PyTorch model to convert (the report says so).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from compress.ship.convert import out_of_place
from compress.ship.targets.source import Source, needs_model


def convert(source: Source, work: Path) -> list[Path]:
    model = needs_model(source, "tflite")
    import litert_torch

    path = work / f"{source.base}.tflite"
    with contextlib.redirect_stdout(io.StringIO()), out_of_place(model):  # its progress lines: no log
        converted = litert_torch.convert(model.eval(), (source.example[:1].contiguous(),))
        converted.export(str(path))
    return [path]
