"""The onnxruntime backend of the quantize stage: one parent's dynamic and static int8 ONNX files,
with the accuracy-aware fallback and, with ``prefer: latency``, the latency-aware search."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.quantization import evaluate, ort
from compress.quantization import search as fallbacks
from compress.quantization.job import (
    Job,
    Reference,
    accuracy_step,
    log_variant,
    test_accuracy,
    variant_metrics,
)
from compress.quantization.qat_job import QAT_MODES, quantize_aware
from compress.variants import Variant


def quantize_with_onnxruntime(job: Job) -> list[tuple[Variant | None, dict[str, Any]]]:
    from onnxruntime.quantization.registry import QDQRegistry

    cfg, bundle, log = job.cfg, job.bundle, job.ctx.log
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
    threads = cfg.latency.threads
    fp32_runner = evaluate.onnx_runner(fp32, job.sample, threads)
    reference = Reference(fp32, parent_val, parent_test, fp32_sizes, fp32_runner)
    results = []
    for mode in cfg.modes:
        if mode in QAT_MODES:
            results.append(quantize_aware(job, mode, reference))
            continue
        name = cfg.output_name(job.parent.name, mode)
        work = job.out_dir / "work" / name
        work.mkdir(parents=True, exist_ok=True)
        counter = iter(range(1_000_000))
        if mode == "fp16":
            weight_nodes, quantizable = [], []

            def make(excluded: list[str], path: Path) -> Path:
                return ort.convert_fp16(fp32, path)

        elif mode == "dynamic":
            weight_nodes = [n for n, t in nodes if t in settings.dynamic_op_types]
            quantizable = weight_nodes

            def make(excluded: list[str], path: Path) -> Path:
                return ort.quantize_onnx_dynamic(pre, path, settings, excluded)

        else:
            weight_nodes = [n for n, t in nodes if t in ort.WEIGHT_OP_TYPES]
            quantizable = [n for n, t in nodes if t in QDQRegistry]
            reader = ort.ImageReader(job.images, cfg.calibration.batch_size)
            cache = work / "calibration.json"
            calibrated = _calibration_onnx(job, pre, meta)

            def make(excluded: list[str], path: Path, reader=reader, cache=cache, src=calibrated) -> Path:
                return ort.quantize_onnx_static(src, path, reader, settings, excluded, cache)

        def val_accuracy(excluded: list[str], make=make, work=work, counter=counter) -> float:
            path = make(excluded, work / f"try-{next(counter)}.onnx")
            try:
                return evaluate.onnx_accuracy(path, bundle, bundle.val)["accuracy"]
            finally:
                path.unlink(missing_ok=True)

        excluded, tries, sensitivity = accuracy_step(
            cfg, mode, weight_nodes, val_accuracy, parent_val, has_val
        )
        search: list[dict[str, Any]] = []
        if cfg.prefer == "latency":
            kinds = ort.node_kinds(pre)
            types = {kinds[n] for n, _ in nodes if n in quantizable}
            groups = {k: [n for n, _ in nodes if kinds[n] == k and n in quantizable] for k in sorted(types)}

            def build(ex: list[str], make=make, work=work, counter=counter) -> Callable[[], Any]:
                path = make(ex, work / f"try-{next(counter)}.onnx")
                runner = evaluate.onnx_runner(path, job.sample, threads)
                path.unlink(missing_ok=True)
                return runner

            def accept(ex: list[str], val_accuracy=val_accuracy) -> bool:
                return not has_val or fallbacks.meets(parent_val, val_accuracy(ex), cfg.tolerance)

            excluded, search = fallbacks.latency_search(
                excluded,
                groups,
                weight_nodes,
                build,
                fp32_runner,
                accept,
                margin=cfg.latency.margin,
                rounds=cfg.latency.rounds,
                runs=cfg.latency.runs,
            )
            log.info("quantize: %s after the latency search keeps in fp32: %s", name, excluded or "nothing")
        layers = []
        if cfg.sensitivity and mode == "static" and has_val:
            layers = fallbacks.layer_sensitivity(
                weight_nodes, quantizable, val_accuracy, parent_val, excluded
            )
        final = make(excluded, job.out_dir / f"{name}.onnx")
        val = evaluate.onnx_accuracy(final, bundle, bundle.val)["accuracy"] if has_val else None
        test = test_accuracy(job, lambda split, final=final: evaluate.onnx_accuracy(final, bundle, split))
        fp32_ms, int8_ms = evaluate.compare_latency(
            [fp32_runner, evaluate.onnx_runner(final, job.sample, threads)],
            rounds=cfg.latency.rounds,
            runs=cfg.latency.runs,
        )
        sizes = evaluate.file_sizes(final)
        path_used = {
            "fp16": "onnxconverter-common convert_float_to_float16 (fp16 weights and compute, fp32 I/O)",
            "dynamic": f"onnxruntime quantize_dynamic({'/'.join(settings.dynamic_op_types)}, "
            f"weights {settings.weight_type})",
            "static": f"onnxruntime quantize_static(QDQ, {settings.activation_type} activations, "
            f"{settings.weight_type} weights, {settings.calibration_method} calibration)",
        }[mode]
        metrics = variant_metrics(
            job,
            mode,
            val,
            test,
            parent_val,
            parent_test,
            sizes,
            fp32_sizes,
            fp32_ms,
            int8_ms,
            excluded,
            weight_nodes,
        )
        metrics.update(ort.int8_initializers(final))
        metrics["runtime"] = "onnxruntime"
        metrics["parent_runtime_accuracy_note"] = "parent accuracy measured on its fp32 ONNX in onnxruntime"
        log_variant(log, name, metrics)
        record = {
            "name": name,
            "parent": job.parent.name,
            "mode": mode,
            "path": path_used,
            "metrics": metrics,
            "accuracy_tries": [t.to_json() for t in tries],
            "sensitivity": sensitivity,
            "layer_sensitivity": layers,
            "latency_search": search,
            "settings": {
                **{k: v for k, v in vars(settings).items()},
                "calibration_images": len(job.images) if mode == "static" else 0,
                "nodes_to_exclude": excluded,
            },
        }
        variant = Variant(
            name=name,
            format="onnx",
            file=final,
            stage=cfg.label,
            parent=job.parent.name,
            metrics=metrics,
            info={
                "backend": "onnxruntime",
                "mode": mode,
                "path": path_used,
                "fp32_onnx": str(fp32.relative_to(job.out_dir)),
                "fp32_layers": excluded,
                "preprocessing": bundle.preprocessing(),
            },
        )
        results.append((variant, record))
    return results


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
