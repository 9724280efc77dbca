"""Scoring and timing quantized candidates the way the benchmark does: accuracy over a split with
the bundle's normalisation, onnxruntime sessions with a fixed thread count, interleaved latency."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import measure
from compress.data import DataBundle, Split

log = logging.getLogger("compress.quantization")


def accuracy_of(
    predict: Callable[[torch.Tensor], Any], bundle: DataBundle, split: Split, batch_size: int = 500
) -> dict[str, Any]:
    """Top-1 accuracy of any ``predict(normalised batch) -> logits`` over ``split``."""
    correct, count = 0, 0
    for start in range(0, len(split), batch_size):
        x = bundle.normalize(split.x[start : start + batch_size])
        logits = predict(x)
        pred = np.asarray(logits.detach() if isinstance(logits, torch.Tensor) else logits).argmax(1)
        correct += int((torch.from_numpy(pred) == split.y[start : start + batch_size]).sum())
        count += len(pred)
    return {"accuracy": correct / max(count, 1), "correct": correct, "count": count}


def ort_session(path: Path, threads: int = 0):
    """A CPU onnxruntime session, set up as the benchmark sets it up; ``threads=0`` lets
    onnxruntime choose."""
    return measure.ort_session(path, threads)


def onnx_predictor(path: Path, threads: int = 0) -> Callable[[torch.Tensor], np.ndarray]:
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: x.cpu().numpy().astype(np.float32, copy=False)})[0]

    return predict


def onnx_accuracy(path: Path, bundle: DataBundle, split: Split, batch_size: int = 500) -> dict[str, Any]:
    """Run an ONNX file in onnxruntime over ``split`` (normalised as the bundle says)."""
    return accuracy_of(onnx_predictor(path), bundle, split, batch_size)


torch_threads = measure.torch_threads


def compare_latency(
    runners: Sequence[Callable[[], Any]], rounds: int = 15, runs: int = 3, warmup: int = 3
) -> list[dict[str, float]]:
    """Median and min milliseconds per call of each runner, timed in interleaved rounds.

    Interleaving (A, B, C, A, B, C, ...) means a burst of load from another process hits
    every candidate alike, so the comparison stays fair on a shared machine.
    """
    for runner in runners:
        for _ in range(warmup):
            runner()
    samples: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            tic = time.perf_counter()
            for _ in range(runs):
                runner()
            samples[i].append((time.perf_counter() - tic) * 1000 / runs)
    return [
        {"p50_ms": round(statistics.median(s), 4), "min_ms": round(min(s), 4), "rounds": rounds, "runs": runs}
        for s in samples
    ]


def onnx_runner(path: Path, sample: torch.Tensor, threads: int) -> Callable[[], Any]:
    session = ort_session(path, threads)
    feed = {session.get_inputs()[0].name: sample.cpu().numpy().astype(np.float32)}
    return lambda: session.run(None, feed)


def torch_runner(module: Callable[[torch.Tensor], Any], sample: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return module(sample)

    return run


def file_sizes(path: Path) -> dict[str, int]:
    return {"bytes": measure.file_size(path), "gzip_bytes": measure.gzip_size(path)}
