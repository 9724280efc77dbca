"""The onnxruntime backend of the quantize stage: one parent's dynamic and static int8 ONNX files,
with the accuracy-aware fallback and, with ``prefer: latency``, the latency-aware search."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from compress.quantization import evaluate, ort
from compress.quantization import search as fallbacks
from compress.quantization.job import (
    Job,
    Reference,
    accuracy_step,
    log_variant,
    quantized_variant,
    test_accuracy,
    variant_metrics,
    variant_record,
)
from compress.quantization.qat_job import QAT_MODES, quantize_aware
from compress.variants import Variant

Make = Callable[[list[str], Path], Path]  # (nodes kept in fp32, output file) -> the written ONNX file


@dataclass
class _OrtParent:
    """What every non-QAT mode of one parent reuses, so the fp32 export, its graph walk and the
    reference measurements happen once per parent rather than once per mode."""

    settings: ort.OrtSettings
    ref: Reference
    pre: Path  # the pre-processed fp32 ONNX the int8 modes start from
    meta: dict[str, str]
    nodes: list[tuple[str, str]]  # (node name, op type) of ``pre``
    qdq_types: Any  # onnxruntime's QDQRegistry: the op types static QDQ can quantize


def quantize_with_onnxruntime(job: Job) -> list[tuple[Variant | None, dict[str, Any]]]:
    """Every mode of one parent; the fp32 reference (ONNX file, accuracies, size, latency runner)
    is measured once here and shared by all modes, QAT ones included."""
    from onnxruntime.quantization.registry import QDQRegistry

    cfg, bundle = job.cfg, job.bundle
    settings = cfg.ort_settings()
    pdir = job.out_dir / job.parent.name
    fp32, pre = pdir / "fp32.onnx", pdir / "fp32-pre.onnx"
    meta = {"compress.variant": job.parent.name, "preprocessing": json.dumps(bundle.preprocessing())}
    ort.prepare_onnx(job.model, job.sample[:2], fp32, pre, meta)
    has_val = len(bundle.val) > 0
    parent_val = evaluate.onnx_accuracy(fp32, bundle, bundle.val)["accuracy"] if has_val else None
    parent_test = test_accuracy(job, lambda split: evaluate.onnx_accuracy(fp32, bundle, split))
    fp32_sizes = evaluate.file_sizes(fp32)
    nodes = ort.graph_nodes(pre)
    fp32_runner = evaluate.onnx_runner(fp32, job.sample, cfg.latency.threads)
    reference = Reference(fp32, parent_val, parent_test, fp32_sizes, fp32_runner)
    parent = _OrtParent(settings, reference, pre, meta, nodes, QDQRegistry)
    results = []
    for mode in cfg.modes:
        if mode in QAT_MODES:
            results.append(quantize_aware(job, mode, reference))
        else:
            results.append(_quantize_mode(job, mode, parent))
    return results


def _quantize_mode(job: Job, mode: str, parent: _OrtParent) -> tuple[Variant, dict[str, Any]]:
    """One fp16, dynamic or static variant: the accuracy fallback picks the nodes kept in fp32,
    the latency search (``prefer: latency``) may keep more, then the final file is measured."""
    cfg, bundle, ref = job.cfg, job.bundle, parent.ref
    has_val = len(bundle.val) > 0
    name = cfg.output_name(job.parent.name, mode)
    work = job.out_dir / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    counter = iter(range(1_000_000))  # numbers the trial files of this mode
    make, weight_nodes, quantizable = _mode_maker(job, mode, parent, work)
    val_accuracy = partial(_trial_accuracy, job, make, work, counter)
    excluded, tries, sensitivity = accuracy_step(cfg, mode, weight_nodes, val_accuracy, ref.val, has_val)
    search: list[dict[str, Any]] = []
    if cfg.prefer == "latency":
        excluded, search = _latency_search(
            job, name, parent, make, work, counter, val_accuracy, excluded, weight_nodes, quantizable
        )
    layers = []
    if cfg.sensitivity and mode == "static" and has_val:
        layers = fallbacks.layer_sensitivity(weight_nodes, quantizable, val_accuracy, ref.val, excluded)
    final = make(excluded, job.out_dir / f"{name}.onnx")
    metrics = _final_metrics(job, mode, name, final, ref, excluded, weight_nodes)
    searches = {
        "accuracy_tries": [t.to_json() for t in tries],
        "sensitivity": sensitivity,
        "layer_sensitivity": layers,
        "latency_search": search,
    }
    return _ort_variant(job, mode, name, final, parent, metrics, excluded, searches)


def _mode_maker(job: Job, mode: str, parent: _OrtParent, work: Path) -> tuple[Make, list[str], list[str]]:
    """How ``mode`` writes an ONNX file for a given set of fp32 nodes, with the weight nodes the
    accuracy fallback may keep in fp32 and the nodes the latency search may keep there."""
    settings, nodes = parent.settings, parent.nodes
    if mode == "fp16":
        return partial(_make_fp16, parent.ref.fp32), [], []
    if mode == "dynamic":
        weight_nodes = [n for n, t in nodes if t in settings.dynamic_op_types]
        return partial(_make_dynamic, parent.pre, settings), weight_nodes, weight_nodes
    weight_nodes = [n for n, t in nodes if t in ort.WEIGHT_OP_TYPES]
    quantizable = [n for n, t in nodes if t in parent.qdq_types]
    reader = ort.ImageReader(job.images, job.cfg.calibration.batch_size)
    cache = work / "calibration.json"
    calibrated = _calibration_onnx(job, parent.pre, parent.meta)
    return partial(_make_static, calibrated, reader, settings, cache), weight_nodes, quantizable


def _make_fp16(fp32: Path, excluded: list[str], path: Path) -> Path:
    """fp16 keeps no node in fp32 by name: ``excluded`` is accepted only to share ``Make``."""
    return ort.convert_fp16(fp32, path)


def _make_dynamic(pre: Path, settings: ort.OrtSettings, excluded: list[str], path: Path) -> Path:
    return ort.quantize_onnx_dynamic(pre, path, settings, excluded)


def _make_static(
    src: Path, reader: Any, settings: ort.OrtSettings, cache: Path, excluded: list[str], path: Path
) -> Path:
    return ort.quantize_onnx_static(src, path, reader, settings, excluded, cache)


def _trial_accuracy(job: Job, make: Make, work: Path, counter: Iterator[int], excluded: list[str]) -> float:
    """Validation accuracy of one trial file, deleted afterwards so trials do not pile up."""
    path = make(excluded, work / f"try-{next(counter)}.onnx")
    try:
        return evaluate.onnx_accuracy(path, job.bundle, job.bundle.val)["accuracy"]
    finally:
        path.unlink(missing_ok=True)


def _trial_runner(
    job: Job, make: Make, work: Path, counter: Iterator[int], excluded: list[str]
) -> Callable[[], Any]:
    """A latency runner on one trial file; the session holds the model, so the file can go."""
    path = make(excluded, work / f"try-{next(counter)}.onnx")
    runner = evaluate.onnx_runner(path, job.sample, job.cfg.latency.threads)
    path.unlink(missing_ok=True)
    return runner


def _within_tolerance(
    job: Job, parent_val: float | None, val_accuracy: Callable[[list[str]], float], excluded: list[str]
) -> bool:
    """Whether a latency-search candidate keeps the accuracy (always, without a validation split)."""
    has_val = len(job.bundle.val) > 0
    return not has_val or fallbacks.meets(parent_val, val_accuracy(excluded), job.cfg.tolerance)


def _latency_search(
    job: Job,
    name: str,
    parent: _OrtParent,
    make: Make,
    work: Path,
    counter: Iterator[int],
    val_accuracy: Callable[[list[str]], float],
    excluded: list[str],
    weight_nodes: list[str],
    quantizable: list[str],
) -> tuple[list[str], list[dict[str, Any]]]:
    """``prefer: latency``: keep whole kinds of quantizable nodes in fp32 where that is faster."""
    cfg, nodes = job.cfg, parent.nodes
    kinds = ort.node_kinds(parent.pre)
    types = {kinds[n] for n, _ in nodes if n in quantizable}
    groups = {k: [n for n, _ in nodes if kinds[n] == k and n in quantizable] for k in sorted(types)}
    excluded, search = fallbacks.latency_search(
        excluded,
        groups,
        weight_nodes,
        partial(_trial_runner, job, make, work, counter),
        parent.ref.runner,
        partial(_within_tolerance, job, parent.ref.val, val_accuracy),
        margin=cfg.latency.margin,
        rounds=cfg.latency.rounds,
        runs=cfg.latency.runs,
    )
    job.ctx.log.info("quantize: %s after the latency search keeps in fp32: %s", name, excluded or "nothing")
    return excluded, search


def _final_metrics(
    job: Job,
    mode: str,
    name: str,
    final: Path,
    ref: Reference,
    excluded: list[str],
    weight_nodes: list[str],
) -> dict[str, Any]:
    """The shipped file measured against the fp32 reference, and logged."""
    cfg, bundle = job.cfg, job.bundle
    has_val = len(bundle.val) > 0
    val = evaluate.onnx_accuracy(final, bundle, bundle.val)["accuracy"] if has_val else None
    test = test_accuracy(job, lambda split: evaluate.onnx_accuracy(final, bundle, split))
    fp32_ms, int8_ms = evaluate.compare_latency(
        [ref.runner, evaluate.onnx_runner(final, job.sample, cfg.latency.threads)],
        rounds=cfg.latency.rounds,
        runs=cfg.latency.runs,
    )
    sizes = evaluate.file_sizes(final)
    metrics = variant_metrics(
        job, mode, val, test, ref.val, ref.test, sizes, ref.sizes, fp32_ms, int8_ms, excluded, weight_nodes
    )
    metrics.update(ort.int8_initializers(final))
    metrics["runtime"] = "onnxruntime"
    metrics["parent_runtime_accuracy_note"] = "parent accuracy measured on its fp32 ONNX in onnxruntime"
    log_variant(job.ctx.log, name, metrics)
    return metrics


def _path_used(mode: str, settings: ort.OrtSettings) -> str:
    """The human-readable recipe recorded with the variant."""
    return {
        "fp16": "onnxconverter-common convert_float_to_float16 (fp16 weights and compute, fp32 I/O)",
        "dynamic": f"onnxruntime quantize_dynamic({'/'.join(settings.dynamic_op_types)}, "
        f"weights {settings.weight_type})",
        "static": f"onnxruntime quantize_static(QDQ, {settings.activation_type} activations, "
        f"{settings.weight_type} weights, {settings.calibration_method} calibration)",
    }[mode]


def _ort_variant(
    job: Job,
    mode: str,
    name: str,
    final: Path,
    parent: _OrtParent,
    metrics: dict[str, Any],
    excluded: list[str],
    searches: dict[str, Any],
) -> tuple[Variant, dict[str, Any]]:
    """The stage's record of one variant and the ``Variant`` it ships; ``searches`` holds the
    accuracy tries, sensitivity and latency-search logs in the record's key order."""
    settings = parent.settings
    path_used = _path_used(mode, settings)
    calibration = len(job.images) if mode == "static" else 0
    record = variant_record(
        job,
        name,
        mode,
        path_used,
        metrics,
        **searches,
        settings={**vars(settings), "calibration_images": calibration, "nodes_to_exclude": excluded},
    )
    variant = quantized_variant(
        job,
        name,
        "onnx",
        final,
        metrics,
        {
            "backend": "onnxruntime",
            "mode": mode,
            "path": path_used,
            "fp32_onnx": str(parent.ref.fp32.relative_to(job.out_dir)),
            "fp32_layers": excluded,
        },
    )
    return variant, record


def _calibration_onnx(job: Job, pre: Path, meta: dict[str, str]) -> Path:
    """The pre-processed fp32 ONNX that static calibration starts from: the parent's, or its copy
    with re-estimated BatchNorm statistics (``Job.calibration_model``), exported once per parent
    into the work directory (the stage deletes it; the fp32 reference stays the parent's)."""
    model = job.calibration_model()
    if model is job.model:
        return pre
    work = job.out_dir / "work" / job.parent.name
    adapted = work / "fp32-bn-pre.onnx"
    if not adapted.is_file():
        work.mkdir(parents=True, exist_ok=True)
        ort.prepare_onnx(model, job.sample[:2], work / "fp32-bn.onnx", adapted, meta)
    return adapted
