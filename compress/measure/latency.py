"""Latency, and the runtime settings it is taken under.

- the timer: warms up, never times the first call, repeats until both a minimum number of calls
  and a minimum time are reached, interleaves the candidates so machine noise is shared, and
  reports median, p95 and spread;
- the runtimes: an onnxruntime CPU session and a torch thread setting with the thread count
  fixed, the same input tensor for every candidate;
- the machine: the CPU model a latency was taken on, and whether its int8 kernels can saturate.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ---------------------------------------------------------------- the timer


@dataclass
class Latency:
    """Wall-clock latency of one call at one batch size, in milliseconds.

    ``spread_pct`` is the interquartile range as a percentage of the median: a noisy machine
    shows up there rather than in a silently wrong median.
    """

    batch: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    iqr_ms: float
    spread_pct: float
    repeats: int
    throughput: float  # images per second at the median

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_latency(
    fn: Callable[[], object],
    batch: int,
    *,
    warmup: int = 10,
    repeats: int = 50,
    min_seconds: float = 1.0,
    max_seconds: float = 30.0,
) -> Latency:
    """Time ``fn()`` after ``warmup`` untimed calls (at least one: the first call is never timed).

    Timed calls continue until ``repeats`` calls AND ``min_seconds`` have passed, or
    ``max_seconds`` has passed (but never fewer than 5 calls).
    """
    (latency,) = time_interleaved(
        [fn], batch, warmup=warmup, repeats=repeats, min_seconds=min_seconds, max_seconds=max_seconds
    )
    return latency


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    batch: int,
    *,
    warmup: int = 10,
    repeats: int = 50,
    min_seconds: float = 1.0,
    max_seconds: float = 30.0,
) -> list[Latency]:
    """Time several calls in interleaved rounds (A, B, C, A, B, C, ...), each as ``time_latency``.

    On a shared machine the load changes from second to second; timing the candidates one after
    the other would put that change into their ratios. Interleaved, a burst of load hits every
    candidate alike, so "B is 1.3x faster than A" holds up. Each call gets at least ``repeats``
    timed calls and about ``min_seconds`` of timing (the whole loop stops after ``max_seconds``
    per call, but never before 5 calls each).
    """
    for fn in fns:
        for _ in range(max(1, warmup)):
            fn()
    samples: list[list[int]] = [[] for _ in fns]
    clock = time.perf_counter_ns
    started = clock()
    count = max(1, len(fns))
    min_ns, max_ns = int(min_seconds * 1e9) * count, int(max_seconds * 1e9) * count
    while True:
        for fn, taken in zip(fns, samples, strict=True):
            tic = clock()
            fn()
            taken.append(clock() - tic)
        elapsed = clock() - started
        fewest = min(len(s) for s in samples)
        if fewest >= repeats and elapsed >= min_ns:
            break
        if elapsed >= max_ns and fewest >= 5:
            break
    return [_latency(taken, batch) for taken in samples]


def _latency(samples: list[int], batch: int) -> Latency:
    ms = np.asarray(samples, dtype=np.float64) / 1e6
    p25, p50, p75, p95 = np.percentile(ms, [25, 50, 75, 95])
    return Latency(
        batch=batch,
        p50_ms=float(p50),
        p95_ms=float(p95),
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        iqr_ms=float(p75 - p25),
        spread_pct=float(100 * (p75 - p25) / p50) if p50 > 0 else 0.0,
        repeats=len(samples),
        throughput=float(batch / (p50 / 1e3)) if p50 > 0 else float("inf"),
    )


# ---------------------------------------------------------------- runtimes, threads and inputs


def resolve_threads(threads: int | str) -> int:
    """``"all"`` means every core this process may run on."""
    if threads == "all":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    return int(threads)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Fix torch's intra-op thread count for the block, then restore it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ort_session(path: Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session with a fixed thread count and full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def fixed_inputs(images: torch.Tensor, batch: int) -> torch.Tensor:
    """The first ``batch`` images (tiled if there are fewer), contiguous float32 on the CPU."""
    if len(images) < batch:
        reps = -(-batch // len(images))
        images = images.repeat(reps, *([1] * (images.dim() - 1)))
    return images[:batch].contiguous().float().cpu()


# ---------------------------------------------------------------- the machine


@functools.lru_cache(maxsize=4)
def _cpuinfo_field(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first ``name : value`` line of /proc/cpuinfo (None off Linux); read once per field."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def int8_saturates(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> bool:
    """Whether onnxruntime's x86 int8 kernels can saturate on this CPU.

    Without VNNI, x86 multiplies uint8 activations by int8 weights with ``vpmaddubsw``, whose
    pairwise sums clip at int16: a full 8-bit weight grid then gives wrong outputs (onnxruntime's
    quantization docs; measured here on an AVX2-only EPYC: QAT LeNet-5 logits off by 0.19 and
    92.6 % top-1 agreement with the PyTorch program). 7-bit weights cannot clip. ARM and VNNI
    CPUs (``avx512_vnni``, ``avx_vnni``) are safe.
    """
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = _cpuinfo_field("flags", cpuinfo)
    if flags is None:
        return False  # not Linux: nothing to read, assume a modern (VNNI) CPU
    return not {"avx512_vnni", "avx_vnni"} & set(flags.split())
