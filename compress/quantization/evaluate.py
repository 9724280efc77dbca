"""Scoring and timing quantized candidates the way the benchmark does: accuracy over a split with
the bundle's normalisation, onnxruntime sessions with a fixed thread count, and latency from the
benchmark's own interleaved timer (``compress.measure.time_interleaved``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import measure
from compress.data import DataBundle, Split

WARMUP_CALLS = 3  # untimed calls of each runner before its first timed round
UNCAPPED_SECONDS = 1e9  # no time cap: ``rounds`` alone says when the timing stops


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


def onnx_predictor(path: Path, threads: int = 0) -> Callable[[torch.Tensor], np.ndarray]:
    """``predict(normalised batch) -> logits`` of an ONNX file in a benchmark-style onnxruntime
    session; ``threads=0`` lets onnxruntime choose (scoring is not timed, so it may use every core)."""
    session = measure.ort_session(path, threads)
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: x.cpu().numpy().astype(np.float32, copy=False)})[0]

    return predict


def onnx_accuracy(path: Path, bundle: DataBundle, split: Split, batch_size: int = 500) -> dict[str, Any]:
    """Run an ONNX file in onnxruntime over ``split`` (normalised as the bundle says)."""
    return accuracy_of(onnx_predictor(path), bundle, split, batch_size)


def interleaved_ms(runners: Sequence[Callable[[], Any]], rounds: int, runs: int) -> list[dict[str, float]]:
    """Median and fastest milliseconds per call of each runner, in the stage's record format.

    Timed by ``measure.time_interleaved`` (A, B, C, A, B, C, ...: a burst of load from another
    process hits every candidate alike), with the stage's meaning of its settings: exactly
    ``rounds`` rounds, each timing ``runs`` back-to-back calls and keeping their average.
    """

    def back_to_back(runner: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(runs):
                runner()

        return run

    timed = measure.time_interleaved(
        [back_to_back(runner) for runner in runners],
        1,  # the images per call do not matter here: only the milliseconds are kept
        warmup=-(-WARMUP_CALLS // runs),
        repeats=rounds,
        min_seconds=0.0,
        max_seconds=UNCAPPED_SECONDS,
    )
    return [
        {
            "p50_ms": round(t.p50_ms / runs, 4),
            "min_ms": round(t.min_ms / runs, 4),
            "rounds": rounds,
            "runs": runs,
        }
        for t in timed
    ]


def onnx_runner(path: Path, sample: torch.Tensor, threads: int) -> Callable[[], Any]:
    """One timed call: ``sample`` through the file in a session with ``threads`` intra-op threads."""
    session = measure.ort_session(path, threads)
    feed = {session.get_inputs()[0].name: sample.cpu().numpy().astype(np.float32)}
    return lambda: session.run(None, feed)


def torch_runner(module: Callable[[torch.Tensor], Any], sample: torch.Tensor) -> Callable[[], Any]:
    """One timed call: ``sample`` through a PyTorch module without autograd."""

    def run() -> Any:
        with torch.no_grad():
            return module(sample)

    return run


def file_sizes(path: Path) -> dict[str, int]:
    """Bytes on disk and gzip-compressed, as the benchmark sizes files."""
    return {"bytes": measure.file_size(path), "gzip_bytes": measure.gzip_size(path)}
