"""Int8 post-training quantization mechanics: onnxruntime and torchao, apart from the stage.

The ``quantize`` stage (``compress/stages/quantize.py``) decides *what* to quantize and when
a result is good enough; this module knows *how*:

- onnxruntime: export + ``quant_pre_process``, ``quantize_dynamic`` / ``quantize_static``
  (QDQ) with a calibration reader over training images, evaluation of an ONNX file over a
  ``Split`` with the bundle's normalisation, and interleaved latency timing;
- PyTorch: torchao's PT2E flow (``prepare_pt2e`` / ``convert_pt2e`` with the X86 inductor
  quantizer) for static int8, ``torchao.quantization.quantize_`` for dynamic int8 of Linear
  layers, and saving the result as a ``torch.export`` program (.pt2);
- the accuracy-aware search (keep the most sensitive layers in fp32 until a tolerance is
  met) and the latency-aware search (drop from quantization what measurably slows it down),
  both written against plain callables so that either backend can use them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from compress import faults, measure
from compress.data import DataBundle, Split
from compress.exporting import INPUT_NAME, export_onnx
from compress.fileio import atomic_path

log = logging.getLogger(__name__)

# Op types onnxruntime's dynamic quantizer handles (IntegerOpsRegistry in
# onnxruntime/quantization/registry.py); kept here so config validation needs no onnxruntime import.
DYNAMIC_OP_TYPES = (
    "MatMul",
    "Gemm",
    "Conv",
    "Attention",
    "LSTM",
    "Gather",
    "Transpose",
    "EmbedLayerNormalization",
)
WEIGHT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ORT_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
ORT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


# ------------------------------------------------------------------ evaluation and timing


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


# ------------------------------------------------------------------ onnxruntime


class ImageReader:
    """onnxruntime ``CalibrationDataReader`` over a fixed tensor of normalised images.

    It only ever holds the tensor it is given; the stage builds it from
    ``data.calibration_images`` (training images), and tests spy on ``fed``.
    """

    def __init__(self, images: torch.Tensor, batch_size: int = 64, input_name: str = INPUT_NAME):
        self.images = images.cpu().numpy().astype(np.float32)
        self.batch_size = batch_size
        self.input_name = input_name
        self.fed = 0
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.images):
            return None
        batch = self.images[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        self.fed += len(batch)
        faults.checkpoint(f"calibrate:batch{-(-self._start // self.batch_size)}")
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._start = 0

    def __iter__(self) -> ImageReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size


@dataclass
class OrtSettings:
    per_channel: bool = False
    reduce_range: bool = False
    activation_type: str = "uint8"
    weight_type: str = "int8"
    dynamic_op_types: list[str] = field(default_factory=lambda: ["MatMul", "Gemm"])
    calibration_method: str = "minmax"
    percentile: float = 99.999
    calibration_batch: int = 64


def prepare_onnx(
    model: nn.Module, sample: torch.Tensor, fp32_path: Path, pre_path: Path, metadata: dict[str, str]
) -> None:
    """fp32 ONNX (the shared exporter) and its onnxruntime quantization pre-processing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    export_onnx(model, sample, fp32_path, metadata=metadata)
    with atomic_path(pre_path) as tmp, _quiet():
        quant_pre_process(str(fp32_path), str(tmp))


def graph_nodes(path: Path) -> list[tuple[str, str]]:
    """(name, op_type) of every node, in graph order."""
    model = onnx.load(str(path), load_external_data=False)
    return [(n.name, n.op_type) for n in model.graph.node]


def quantize_onnx_dynamic(
    pre_path: Path, out_path: Path, s: OrtSettings, exclude: Sequence[str] = ()
) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(out_path) as tmp, _quiet():
        quantize_dynamic(
            str(pre_path),
            str(tmp),
            op_types_to_quantize=list(s.dynamic_op_types),
            per_channel=s.per_channel,
            reduce_range=s.reduce_range,
            weight_type=getattr(QuantType, ORT_TYPES[s.weight_type]),
            nodes_to_exclude=list(exclude),
            extra_options={"MatMulConstBOnly": True},
        )
    return out_path


def quantize_static(*args: Any, **kwargs: Any) -> Any:
    """onnxruntime's ``quantize_static``; a module-level name so tests can spy on it."""
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    return ort_quantize_static(*args, **kwargs)


def quantize_onnx_static(
    pre_path: Path,
    out_path: Path,
    reader: ImageReader,
    s: OrtSettings,
    exclude: Sequence[str] = (),
    cache_path: Path | None = None,
) -> Path:
    """QDQ static int8; ``cache_path`` keeps the calibrated ranges so retries skip calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    reader.rewind()
    extra: dict[str, Any] = {}
    if s.calibration_method == "percentile":
        extra["CalibPercentile"] = s.percentile
    with atomic_path(out_path) as tmp, _quiet():
        quantize_static(
            str(pre_path),
            str(tmp),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=s.per_channel,
            reduce_range=s.reduce_range,
            activation_type=getattr(QuantType, ORT_TYPES[s.activation_type]),
            weight_type=getattr(QuantType, ORT_TYPES[s.weight_type]),
            nodes_to_exclude=list(exclude),
            calibrate_method=getattr(CalibrationMethod, ORT_CALIBRATION[s.calibration_method]),
            extra_options=extra,
            calibration_cache_path=str(cache_path) if cache_path is not None else None,
        )
    return out_path


def int8_initializers(path: Path) -> dict[str, int]:
    """How many initializers (and bytes) are 8-bit integers vs 32-bit floats."""
    model = onnx.load(str(path))
    eight = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    counts = {"int8_initializers": 0, "int8_bytes": 0, "float_initializers": 0, "float_bytes": 0}
    for init in model.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        if init.data_type in eight:
            counts["int8_initializers"] += 1
            counts["int8_bytes"] += size
        elif init.data_type == onnx.TensorProto.FLOAT:
            counts["float_initializers"] += 1
            counts["float_bytes"] += 4 * size
    return counts


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer prints and warns a lot; keep it in the debug log."""
    buffer = io.StringIO()
    quant_logger = logging.getLogger()
    level = quant_logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
        warnings.simplefilter("ignore")
        quant_logger.setLevel(max(level, logging.ERROR))
        try:
            yield
        finally:
            quant_logger.setLevel(level)
    if buffer.getvalue().strip():
        log.debug("onnxruntime quantization output: %s", buffer.getvalue())


# ------------------------------------------------------------------ PyTorch (torchao)


def _export(model: nn.Module, sample: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))


def pt2e_static(
    model: nn.Module,
    sample: torch.Tensor,
    images: torch.Tensor,
    exclude: Sequence[str] = (),
    reduce_range: bool = False,
    batch_size: int = 64,
) -> nn.Module:
    """torchao PT2E static int8 with the X86 inductor quantizer, calibrated on ``images``.

    ``exclude`` names modules (e.g. ``classifier``) left in fp32.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    for name in exclude:
        quantizer.set_module_name_qconfig(name, None)
    graph = _export(copy.deepcopy(model).eval(), sample).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                prepared(images[start : start + batch_size])
        return _drop_unused_tensors(convert_pt2e(prepared))


def _drop_unused_tensors(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_pt2e keeps the fp32 weights beside their int8 copies; drop those no node reads,
    or a saved program would carry both."""
    used = {str(n.target) for n in graph.graph.nodes if n.op == "get_attr"}
    named = [*graph.named_parameters(remove_duplicate=False), *graph.named_buffers(remove_duplicate=False)]
    for name, _ in named:
        if name in used:
            continue
        owner, _, attr = name.rpartition(".")
        module = graph.get_submodule(owner) if owner else graph
        if attr in module._parameters:
            del module._parameters[attr]
        elif attr in module._buffers:
            del module._buffers[attr]
    graph.delete_all_unused_submodules()
    graph.recompile()
    return graph


def torchao_dynamic(model: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, str]:
    """Dynamic int8 of Linear layers; returns the module and which path made it."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantized = copy.deepcopy(model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(quantized, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        with torch.no_grad():
            quantized(sample)
        return quantized, "torchao.quantize_(Int8DynamicActivationInt8WeightConfig): Linear layers"
    except Exception as exc:  # an API change must not cost the run: fall back to PT2E dynamic
        log.warning("torchao quantize_ failed (%s); using the PT2E dynamic config instead", exc)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(_export(copy.deepcopy(model).eval(), sample).module(), quantizer)
        with torch.no_grad():
            prepared(sample)
        return _drop_unused_tensors(
            convert_pt2e(prepared)
        ), "torchao PT2E X86InductorQuantizer(is_dynamic=True)"


def save_exported(module: nn.Module, sample: torch.Tensor, path: Path) -> nn.Module:
    """``torch.export.save`` a program and prove it reloads and computes the same logits.

    Returns the reloaded module (what ships); raises if any step fails.
    """
    program = _export(module, sample.clone())  # a clone: a view would store its whole base tensor
    staging = path.parent / f".{path.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        torch.export.save(program, str(staging / path.name))  # the archive is named after the file
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        expected, got = module(sample), loaded(sample)
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{path.name}: reloaded program differs ({(expected - got).abs().max():.3g})")
    return loaded


def torch_predictor(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return predict


# ------------------------------------------------------------------ searches


@dataclass
class Try:
    excluded: list[str]
    val_accuracy: float
    drop_pp: float
    meets: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "fp32_layers": self.excluded,
            "val_accuracy": self.val_accuracy,
            "drop_pp": round(self.drop_pp, 4),
            "meets_tolerance": self.meets,
            "note": self.note,
        }


def drop_pp(parent: float, accuracy: float) -> float:
    """Accuracy lost, in percentage points (negative when int8 is better)."""
    return (parent - accuracy) * 100


def meets(parent: float, accuracy: float, tolerance: float | None) -> bool:
    return tolerance is None or drop_pp(parent, accuracy) <= tolerance + 1e-9


def accuracy_fallback(
    candidates: Sequence[str],
    val_accuracy: Callable[[list[str]], float],
    parent_val: float,
    tolerance: float | None,
    log_: logging.Logger = log,
) -> tuple[list[str], list[Try], list[dict[str, Any]]]:
    """Keep the most sensitive layers in fp32 until the tolerance is met or none is left.

    ``val_accuracy(excluded)`` quantizes with ``excluded`` left in fp32 and returns the
    validation accuracy. Sensitivity is measured by leaving one layer at a time in fp32:
    the layer whose exclusion recovers the most accuracy is the most sensitive.
    Returns (layers kept in fp32, the tries in order, the sensitivity table).
    """
    memo: dict[tuple[str, ...], float] = {}

    def measure(excluded: list[str]) -> float:
        key = tuple(sorted(excluded))
        if key not in memo:
            memo[key] = val_accuracy(excluded)
        return memo[key]

    first = measure([])
    tries = [Try([], first, drop_pp(parent_val, first), meets(parent_val, first, tolerance), "all quantized")]
    if tries[0].meets or not candidates:
        return [], tries, []
    sensitivity = []
    for name in candidates:
        acc = measure([name])
        gain = round((acc - first) * 100, 4)
        sensitivity.append({"layer": name, "val_accuracy_if_fp32": acc, "recovers_pp": gain})
    ranked = [row["layer"] for row in sorted(sensitivity, key=lambda r: -r["recovers_pp"])]
    log_.info("quantize: sensitivity ranking (most sensitive first): %s", ", ".join(ranked))
    for k in range(1, len(ranked) + 1):
        excluded = ranked[:k]
        acc = measure(excluded)
        ok = meets(parent_val, acc, tolerance)
        tries.append(Try(excluded, acc, drop_pp(parent_val, acc), ok, f"{k} most sensitive in fp32"))
        log_.info("quantize: fp32 layers %s -> val %.4f (drop %.3f pp)", excluded, acc, tries[-1].drop_pp)
        if ok:
            return excluded, tries, sensitivity
    return ranked, tries, sensitivity


def latency_search(
    start: list[str],
    groups: dict[str, list[str]],
    weight_nodes: Sequence[str],
    build: Callable[[list[str]], Callable[[], Any]],
    parent: Callable[[], Any],
    accept: Callable[[list[str]], bool],
    margin: float = 0.05,
    rounds: int = 15,
    runs: int = 3,
    max_nodes: int = 16,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Greedily leave in fp32 the op types, then single layers, that make int8 slower.

    ``build(excluded)`` returns a timed runner of that mix; ``parent`` runs the fp32 model.
    Each step times every candidate beside the current mix and the parent (interleaved)
    and compares the fastest round of each (the least disturbed by other processes); the
    fastest candidate is kept only if it beats the current mix by ``margin`` and
    ``accept(excluded)`` (the accuracy tolerance) still holds and a second, independent
    comparison agrees. At least one weight layer
    stays quantized: an int8 variant with none would just be its parent. Returns the final
    exclusions and a record of every measurement.
    """
    current = list(start)
    record: list[dict[str, Any]] = []
    remaining = [n for n in weight_nodes if n not in current]
    layers = {n: [n] for n in remaining} if len(remaining) <= max_nodes else {}
    for level, options in (("op_type", dict(groups)), ("layer", layers)):
        while True:
            moves = {
                label: sorted(set(current) | set(names))
                for label, names in options.items()
                if not set(names) <= set(current)
                and any(n not in set(current) | set(names) for n in weight_nodes)
            }
            if not moves:
                break
            runners = [parent, build(current)] + [build(ex) for ex in moves.values()]
            timings = compare_latency(runners, rounds=rounds, runs=runs)
            current_ms = timings[1]["min_ms"]
            step: dict[str, Any] = {
                "level": level,
                "fp32": timings[0],
                "current": {"fp32_layers": current, **timings[1]},
                "candidates": [
                    {"exclude": label, "fp32_layers": ex, **t}
                    for (label, ex), t in zip(moves.items(), timings[2:], strict=True)
                ],
            }
            record.append(step)
            best_label, best = min(zip(moves, timings[2:], strict=True), key=lambda pair: pair[1]["min_ms"])
            if best["min_ms"] >= current_ms * (1 - margin):
                step["chosen"] = None
                break
            if not accept(moves[best_label]):
                step["chosen"] = None
                step["rejected"] = f"{best_label}: misses the accuracy tolerance"
                options = {k: v for k, v in options.items() if k != best_label}
                continue
            # confirm in a fresh interleaved comparison, so one lucky round cannot decide
            confirm = compare_latency([build(current), build(moves[best_label])], rounds=rounds, runs=runs)
            step["confirm"] = {"current": confirm[0], "candidate": confirm[1]}
            if confirm[1]["min_ms"] >= confirm[0]["min_ms"] * (1 - margin):
                step["chosen"] = None
                step["rejected"] = f"{best_label}: not faster when measured again"
                options = {k: v for k, v in options.items() if k != best_label}
                continue
            step["chosen"] = best_label
            current = moves[best_label]
    return current, record
