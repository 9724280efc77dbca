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
import torch

from compress import measure
from compress.data import DataBundle
from compress.ship import edge, runtimes
from compress.ship.bundle import is_fp16, is_quantized
from compress.ship.convert import export_onnx
from compress.ship.targets.registry import RUNTIMES as TARGET_OF
from compress.ship.targets.source import Source
from compress.variants import Variant

RUNTIMES = ("onnxruntime", "ort", "openvino")


class NotShippable(Exception):
    """The variant has no ONNX form (a torch.export int8 program of the pytorch backend)."""


def onnx_file(variant: Variant, bundle: DataBundle, out_dir: Path) -> Path:
    """The variant's ONNX file: its own for onnx variants, else exported into ``out_dir``."""
    if variant.format == "onnx":
        return Path(variant.file)
    if variant.format != "torch":
        raise NotShippable(f"variant {variant.name!r} is a {variant.format} program with no ONNX form")
    model, _ = variant.load_torch()
    sample = _images(bundle, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_onnx(model, sample.float(), out_dir / "model.onnx")


def runtime_files(path: Path, runtime: str, bundle: DataBundle, out_dir: Path) -> list[Path]:
    """The files ``runtime`` loads for the ONNX file ``path`` (the first is the one loaded), made
    by the export stage's converter for that runtime; the ONNX file itself for onnxruntime."""
    if runtime == "onnxruntime":
        return [path]
    target = TARGET_OF[runtime]
    example = _images(bundle, 8).float()
    source = Source(
        variant="scored",
        base="model",
        onnx=path,
        model=None,
        example=example,
        quantized=is_quantized(path),
        low_precision=is_fp16(path),
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
    images = _images(bundle, batch_size)
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


def _images(bundle: DataBundle, count: int) -> torch.Tensor:
    """The first ``count`` validation images, normalised (training images when there is no
    validation split): the search never reads the test split."""
    split = bundle.val if len(bundle.val) else bundle.train
    return bundle.normalize(split.x[:count])
