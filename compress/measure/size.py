"""Sizes and counts of a model: bytes on disk, gzip-compressed bytes (what sparsity buys on the
wire), parameters and non-zero parameters, from the torch module or, without one, the ONNX file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.fileio import sha256_file

GZIP_LEVEL = 9


def file_size(path: Path) -> int:
    return Path(path).stat().st_size


def gzip_size(path: Path, level: int = GZIP_LEVEL) -> int:
    """Bytes of the file gzip-compressed at ``level`` (streamed; header mtime fixed at 0).

    Remembered by content for the process: level 9 takes up to 2 s on a sparse model file, and
    a run sizes the same shipped files in the export stage and again in the benchmark.
    """
    key = (sha256_file(path), level)
    if key not in _GZIP_SIZES:
        compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip container
        total = 0
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                total += len(compressor.compress(block))
        _GZIP_SIZES[key] = total + len(compressor.flush())
    return _GZIP_SIZES[key]


_GZIP_SIZES: dict[tuple[str, int], int] = {}


def gzip_bytes(data: bytes, level: int = GZIP_LEVEL) -> int:
    return len(gzip.compress(data, compresslevel=level, mtime=0))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def onnx_initializer_counts(path: Path) -> tuple[int, int]:
    """(elements, non-zero elements) of an ONNX file's weight initializers (rank >= 1).

    Used only when a variant has no torch form and no parent to take counts from; for an
    int8 model the non-zero count is of the stored int8 values, not of dequantized weights.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    total = nonzero = 0
    for init in proto.graph.initializer:
        if len(init.dims) == 0:
            continue
        array = numpy_helper.to_array(init)
        if not np.issubdtype(array.dtype, np.number):
            continue
        if array.dtype == np.int64:  # shapes and axes, not weights
            continue
        total += array.size
        nonzero += int(np.count_nonzero(array))
    return total, nonzero


def file_sizes(path: Path) -> dict[str, int]:
    """Bytes on disk and gzip-compressed, as the benchmark sizes files."""
    return {"bytes": file_size(path), "gzip_bytes": gzip_size(path)}
