"""Measuring primitives every stage shares, so every number in a report is taken the same way.

- sizes: bytes on disk and gzip-compressed bytes (what sparsity buys on the wire);
- counts: parameters, non-zero parameters, and multiply-accumulates (MACs) per image, counted
  from the shapes seen by forward hooks on Conv/Linear layers (bias adds and activations are
  not MACs, by the usual convention);
- latency: a timer that warms up, never times the first call, repeats until both a minimum
  number of calls and a minimum time are reached, and reports median, p95 and spread;
- runtimes: an onnxruntime CPU session and a torch thread setting with the thread count fixed.
"""

from __future__ import annotations

import functools
import gzip
import os
import platform
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.fileio import sha256_file

GZIP_LEVEL = 9


# ---------------------------------------------------------------- sizes


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


# ---------------------------------------------------------------- counts


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


@dataclass
class MacCount:
    """Per-image multiply-accumulates of Conv and Linear layers.

    ``nonzero_macs`` counts only the MACs whose weight is non-zero: what a sparse kernel
    would have to do, and an upper bound on what pruning can save.
    """

    macs: int
    nonzero_macs: int
    layers: dict[str, int]


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_macs(model: nn.Module, sample: torch.Tensor) -> MacCount:
    """Run ``sample`` (any batch size) through ``model`` and count MACs per image."""
    batch = sample.shape[0]
    layers: dict[str, int] = {}
    nonzero = 0

    def hook(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            nonlocal nonzero
            weight = module.weight.detach()
            if isinstance(module, _CONV):
                # each output element reads in_channels/groups * prod(kernel) weights
                per_output = weight[0].numel()
                positions = output.numel() // batch // weight.shape[0]
                macs = positions * weight.shape[0] * per_output
                nz = positions * int(torch.count_nonzero(weight))
            else:  # Linear: every leading position multiplies the full weight matrix
                positions = output.numel() // batch // weight.shape[0]
                macs = positions * weight.numel()
                nz = positions * int(torch.count_nonzero(weight))
            layers[name] = layers.get(name, 0) + macs
            nonzero += nz

        return record

    hooked = {m: hook(n) for n, m in model.named_modules() if isinstance(m, (*_CONV, nn.Linear))}
    run_hooked(model, sample, hooked)
    return MacCount(macs=sum(layers.values()), nonzero_macs=nonzero, layers=layers)


def run_hooked(model: nn.Module, sample: torch.Tensor, hooks: dict[nn.Module, Callable[..., None]]) -> None:
    """One eval-mode, no-grad forward pass of ``sample`` with forward ``hooks`` on some layers
    (removed afterwards, the model's train/eval mode restored): how layers are observed here."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


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


# ---------------------------------------------------------------- accuracy


def drop_pp(reference: float, accuracy: float) -> float:
    """Accuracy lost against ``reference``, in percentage points (negative when it gained)."""
    return (reference - accuracy) * 100


def accuracy_from_predictions(
    predictions: np.ndarray, labels: np.ndarray, classes: list[str]
) -> tuple[float, int, dict[str, float | None]]:
    """Top-1 accuracy, correct count and per-class accuracy (None for an absent class)."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    hits = predictions == labels
    per_class: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        mask = labels == index
        per_class[name] = float(hits[mask].mean()) if mask.any() else None
    correct = int(hits.sum())
    return correct / max(len(labels), 1), correct, per_class


# ---------------------------------------------------------------- latency


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


# ---------------------------------------------------------------- runtimes and threads


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


def fixed_inputs(images: torch.Tensor, batch: int) -> torch.Tensor:
    """The first ``batch`` images (tiled if there are fewer), contiguous float32 on the CPU."""
    if len(images) < batch:
        reps = -(-batch // len(images))
        images = images.repeat(reps, *([1] * (images.dim() - 1)))
    return images[:batch].contiguous().float().cpu()
