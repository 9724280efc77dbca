"""A variant scored as it ships: its ONNX file run in onnxruntime, the runtime edge teams use.

The recipe search ranks trials by what a user's runtime does with the file it would receive,
not by the PyTorch model that made it: int8 and fp16 only exist as ONNX files, and a pruned
model's speed is whatever onnxruntime's kernels make of it. One function, so the search's
reference and each of its trials are measured the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compress import measure
from compress.data import DataBundle
from compress.ship.convert import export_onnx
from compress.variants import Variant

RUNTIMES = ("onnxruntime",)


class NotShippable(Exception):
    """The variant has no ONNX form (a torch.export int8 program of the pytorch backend)."""


def onnx_file(variant: Variant, bundle: DataBundle, out_dir: Path) -> Path:
    """The variant's ONNX file: its own for onnx variants, else exported into ``out_dir``."""
    if variant.format == "onnx":
        return Path(variant.file)
    if variant.format != "torch":
        raise NotShippable(f"variant {variant.name!r} is a {variant.format} program with no ONNX form")
    model, _ = variant.load_torch()
    sample = bundle.normalize(bundle.val.x[:1] if len(bundle.val) else bundle.train.x[:1])
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_onnx(model, sample.float(), out_dir / "model.onnx")


def score(
    variant: Variant, bundle: DataBundle, out_dir: Path, batch_size: int = 64, threads: int = 1
) -> dict[str, Any]:
    """Validation accuracy, p50 latency at ``batch_size`` on ``threads`` intra-op threads, and
    the file's bytes (raw and gzip) of ``variant`` in onnxruntime."""
    path = onnx_file(variant, bundle, out_dir)
    accuracy = measure.onnx_accuracy(path, bundle, bundle.val)["accuracy"]
    session = measure.ort_session(path, threads)
    name = session.get_inputs()[0].name
    images = bundle.normalize(bundle.val.x[:batch_size] if len(bundle.val) else bundle.train.x[:batch_size])
    x = np.ascontiguousarray(measure.fixed_inputs(images, batch_size).numpy())
    latency = measure.time_latency(
        lambda: session.run(None, {name: x}), batch_size, warmup=3, repeats=20, min_seconds=0.3, max_seconds=5
    )
    sizes = measure.file_sizes(path)
    return {
        "val_accuracy": accuracy,
        "latency_ms": latency.p50_ms,
        "file_bytes": sizes["bytes"],
        "gzip_bytes": sizes["gzip_bytes"],
        "runtime": "onnxruntime",
        "batch_size": batch_size,
        "threads": threads,
    }
