"""Timing quantized candidates the way the benchmark does: onnxruntime sessions with a fixed thread
count, and latency from the benchmark's own interleaved timer (``compress.measure.time_interleaved``).
Scoring (``accuracy_of``, ``onnx_accuracy``) and sizes (``file_sizes``) are the measuring package's,
named here for the quantize modes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import measure
from compress.measure.accuracy import accuracy_of, onnx_accuracy, onnx_predictor
from compress.measure.size import file_sizes

WARMUP_CALLS = 3  # untimed calls of each runner before its first timed round
UNCAPPED_SECONDS = 1e9  # no time cap: ``rounds`` alone says when the timing stops


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


__all__ = [
    "accuracy_of",
    "file_sizes",
    "interleaved_ms",
    "onnx_accuracy",
    "onnx_predictor",
    "onnx_runner",
    "torch_runner",
]
