"""What a converter is given for one variant: its checked ONNX file and/or its PyTorch model,
and the source's logits every converted file must reproduce."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class NotApplicable(Exception):
    """This target does not take this kind of variant (e.g. an int8 ONNX file for LiteRT)."""


@dataclass
class Source:
    variant: str
    base: str  # the variant as a file name
    onnx: Path | None  # the exported ONNX that passed its checks (None if it failed or was not made)
    model: torch.nn.Module | None  # the eager model (None for ONNX-only variants)
    example: torch.Tensor  # a batch of preprocessed test images, for tracing
    quantized: bool  # an int8 ONNX (QDQ / QOperator)
    low_precision: bool  # an fp16 ONNX: other runtimes round differently, as for int8
    reference: np.ndarray  # the source model's logits on ``example`` (the parity sample)


def needs_onnx(source: Source, target: str) -> Path:
    if source.onnx is None:
        raise NotApplicable(
            f"{target} is converted from the ONNX file, and this variant has none that passed"
        )
    return source.onnx


def needs_model(source: Source, target: str) -> torch.nn.Module:
    if source.model is None:
        kind = "an int8 ONNX file" if source.quantized else "an ONNX-only variant"
        raise NotApplicable(
            f"{target} is converted from the PyTorch model and this variant is {kind}; "
            "it ships for this runtime in fp32 only (its fp32 parent)"
        )
    return source.model
