"""A variant scored as it ships: its ONNX file, converted for the user's runtime, run there.

The recipe search ranks trials by what a user's runtime does with the file it would receive,
not by the PyTorch model that made it: int8 and fp16 only exist as ONNX files, and a pruned
model's speed is whatever the runtime's kernels make of it. The runtimes are those that read
the ONNX file, int8 included: onnxruntime itself, ORT Mobile's ``.ort`` and OpenVINO's IR, each
made by the export stage's own converter and run by the benchmark's own runner. LiteRT and
ExecuTorch convert the PyTorch model and ship fp32 only, so a recipe ending in int8 has no file
there. One function, so the search's reference and each of its trials are measured the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from compress import measure
from compress.data import DataBundle
from compress.ship import edge, runtimes
from compress.ship.convert import export_onnx
from compress.ship.targets.registry import RUNTIMES as TARGET_OF
from compress.ship.targets.source import Source
from compress.variants import Variant

RUNTIMES = ("onnxruntime", "ort", "openvino")
INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
            "MatMulInteger", "ConvInteger"}  # fmt: skip


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


def runtime_files(path: Path, runtime: str, bundle: DataBundle, out_dir: Path) -> list[Path]:
    """The files ``runtime`` loads for the ONNX file ``path`` (the first is the one loaded), made
    by the export stage's converter for that runtime; the ONNX file itself for onnxruntime."""
    if runtime == "onnxruntime":
        return [path]
    target = TARGET_OF[runtime]
    example = bundle.normalize(bundle.val.x[:8] if len(bundle.val) else bundle.train.x[:8]).float()
    graph = onnx.load(str(path), load_external_data=False).graph
    source = Source(
        variant="scored",
        base="model",
        onnx=path,
        model=None,
        example=example,
        quantized=any(node.op_type in INT8_OPS for node in graph.node),
        low_precision=any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer),
        reference=measure.onnx_predictor(path)(example),
    )
    folder = out_dir / runtime
    folder.mkdir(parents=True, exist_ok=True)
    made = edge.convert(target, [source], folder)[0][source.variant]
    if isinstance(made, Exception):
        raise made
    return made


def loaded(
    variant: Variant, bundle: DataBundle, out_dir: Path, runtime: str, threads: int = 1
) -> tuple[list[Path], Callable[[torch.Tensor], np.ndarray]]:
    """What ``runtime`` loads for ``variant`` (its files, made in ``out_dir`` if need be) and a
    function normalised images -> logits running it there, as the benchmark runs it."""
    files = runtime_files(onnx_file(variant, bundle, out_dir), runtime, bundle, out_dir)
    return files, runtimes.runner_for(runtime, variant, files[0], threads)


def score(
    variant: Variant,
    bundle: DataBundle,
    out_dir: Path,
    batch_size: int = 64,
    threads: int = 1,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Validation accuracy, p50 latency at ``batch_size`` on ``threads`` intra-op threads, and
    the bytes (raw and gzip) of what ``runtime`` loads for ``variant``."""
    files, run = loaded(variant, bundle, out_dir, runtime, threads)
    accuracy = measure.accuracy_of(run, bundle, bundle.val)["accuracy"]
    images = bundle.normalize(bundle.val.x[:batch_size] if len(bundle.val) else bundle.train.x[:batch_size])
    x = measure.fixed_inputs(images, batch_size).contiguous()
    latency = measure.time_latency(
        lambda: run(x), batch_size, warmup=3, repeats=20, min_seconds=0.3, max_seconds=5
    )
    sizes = [measure.file_sizes(f) for f in files]
    return {
        "val_accuracy": accuracy,
        "latency_ms": latency.p50_ms,
        "file_bytes": sum(s["bytes"] for s in sizes),
        "gzip_bytes": sum(s["gzip_bytes"] for s in sizes),
        "runtime": runtime,
        "batch_size": batch_size,
        "threads": threads,
    }
