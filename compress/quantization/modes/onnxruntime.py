"""What the onnxruntime modes share: the parent's fp32 ONNX reference, exported and measured once
per parent, and the steps every post-training mode (fp16, dynamic, static) takes with its file
maker: the accuracy-aware fallback, with ``prefer: latency`` the latency-aware search, with
``sensitivity`` the per-layer table, then the shipped file."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from compress.measure import within_tolerance
from compress.quantization import evaluate, ort, search
from compress.quantization.finish import Quantized, Reference
from compress.quantization.job import Job

Make = Callable[[list[str], Path], Path]  # (nodes kept in fp32, output file) -> the written ONNX file


@dataclass
class OnnxParent:
    """The parent as onnxruntime runs it, shared by every onnxruntime mode (QAT ones included), so
    the fp32 export, its graph walk and the reference measurements happen once per parent."""

    settings: ort.OrtSettings
    ref: Reference
    fp32: Path  # the fp32 ONNX every variant is compared with
    pre: Path  # its onnxruntime pre-processed copy, which the int8 modes start from
    meta: dict[str, str]  # the ONNX metadata every file of this parent carries
    nodes: list[tuple[str, str]]  # (node name, op type) of ``pre``

    @classmethod
    def prepare(cls, job: Job) -> OnnxParent:
        """Export the parent, score it on validation and test, size it and make its latency runner."""
        bundle, pdir = job.bundle, job.out_dir / job.parent.name
        fp32, pre = pdir / "fp32.onnx", pdir / "fp32-pre.onnx"
        meta = {"compress.variant": job.parent.name, "preprocessing": json.dumps(bundle.preprocessing())}
        ort.prepare_onnx(job.model, job.sample[:2], fp32, pre, meta)
        val, test = job.accuracies(partial(evaluate.onnx_accuracy, fp32, bundle))
        sizes = evaluate.file_sizes(fp32)
        nodes = ort.graph_nodes(pre)
        runner = evaluate.onnx_runner(fp32, job.sample, job.cfg.latency.threads)
        return cls(job.cfg.ort_settings(), Reference(val, test, sizes, runner), fp32, pre, meta, nodes)


@dataclass
class OnnxPass:
    """One post-training mode as the shared steps see it: how it writes a file for a given set of
    fp32 nodes, the weight nodes the accuracy fallback may keep in fp32, the nodes the latency
    search may keep there, and the recipe recorded with the variant."""

    make: Make
    weight_nodes: list[str]
    quantizable: list[str]
    path_used: str


def quantize(
    job: Job, mode: str, parent: OnnxParent, *, build: Callable[[Job, OnnxParent, Path], OnnxPass]
) -> Quantized:
    """One fp16, dynamic or static variant: ``build`` gives the mode's pass; the accuracy fallback
    picks the nodes kept in fp32, the latency search (``prefer: latency``) may keep more, then the
    final file is written for the finishing step."""
    cfg = job.cfg
    name = cfg.output_name(job.parent.name, mode)
    work = job.work_dir(name)
    made = build(job, parent, work)
    excluded, searches = _searches(job, mode, name, parent, made, work)
    final = made.make(excluded, job.out_dir / f"{name}.onnx")
    calibration = len(job.images) if mode == "static" else 0
    return Quantized(
        mode=mode,
        name=name,
        file=final,
        file_format="onnx",
        path_used=made.path_used,
        accuracy=partial(evaluate.onnx_accuracy, final, job.bundle),
        runner=evaluate.onnx_runner(final, job.sample, cfg.latency.threads),
        excluded=excluded,
        weight_layers=made.weight_nodes,
        metrics={
            "runtime": "onnxruntime",
            "parent_runtime_accuracy_note": "parent accuracy measured on its fp32 ONNX in onnxruntime",
        },
        record={
            **searches,
            "settings": {
                **asdict(parent.settings),
                "calibration_images": calibration,
                "nodes_to_exclude": excluded,
            },
        },
        info={
            "backend": "onnxruntime",
            "mode": mode,
            "path": made.path_used,
            "fp32_onnx": str(parent.fp32.relative_to(job.out_dir)),
            "fp32_layers": excluded,
        },
    )


def _searches(
    job: Job, mode: str, name: str, parent: OnnxParent, made: OnnxPass, work: Path
) -> tuple[list[str], dict[str, Any]]:
    """The nodes to keep in fp32, and every measurement that chose them in the record's key order:
    the accuracy fallback's tries and sensitivity ranking, the per-layer table (static with
    ``sensitivity``) and the latency search (``prefer: latency``)."""
    cfg = job.cfg
    counter = itertools.count()  # numbers the trial files of this mode
    val_accuracy = partial(_trial_accuracy, job, made.make, work, counter)
    excluded: list[str] = []
    tries: list[search.Try] = []
    sensitivity: list[dict[str, Any]] = []
    if job.has_val:
        excluded, tries, sensitivity = search.accuracy_step(
            mode, cfg.tolerance, made.weight_nodes, val_accuracy, parent.ref.val
        )
    latency: list[dict[str, Any]] = []
    if cfg.prefer == "latency":
        trial_runner = partial(_trial_runner, job, made.make, work, counter)
        excluded, latency = _latency_search(job, name, parent, made, trial_runner, val_accuracy, excluded)
    layers: list[dict[str, Any]] = []
    if cfg.sensitivity and mode == "static" and job.has_val:
        layers = search.layer_sensitivity(
            made.weight_nodes, made.quantizable, val_accuracy, parent.ref.val, excluded
        )
    return excluded, {
        "accuracy_tries": [t.to_json() for t in tries],
        "sensitivity": sensitivity,
        "layer_sensitivity": layers,
        "latency_search": latency,
    }


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
    return not job.has_val or within_tolerance(parent_val, val_accuracy(excluded), job.cfg.tolerance)


def _latency_search(
    job: Job,
    name: str,
    parent: OnnxParent,
    made: OnnxPass,
    trial_runner: Callable[[list[str]], Callable[[], Any]],
    val_accuracy: Callable[[list[str]], float],
    excluded: list[str],
) -> tuple[list[str], list[dict[str, Any]]]:
    """``prefer: latency``: keep whole kinds of quantizable nodes in fp32 where that is faster."""
    cfg, nodes, quantizable = job.cfg, parent.nodes, made.quantizable
    kinds = ort.node_kinds(parent.pre)
    types = {kinds[n] for n, _ in nodes if n in quantizable}
    groups = {k: [n for n, _ in nodes if kinds[n] == k and n in quantizable] for k in sorted(types)}
    excluded, record = search.latency_search(
        excluded,
        groups,
        made.weight_nodes,
        trial_runner,
        parent.ref.runner,
        partial(_within_tolerance, job, parent.ref.val, val_accuracy),
        margin=cfg.latency.margin,
        rounds=cfg.latency.rounds,
        runs=cfg.latency.runs,
    )
    job.ctx.log.info("quantize: %s after the latency search keeps in fp32: %s", name, excluded or "nothing")
    return excluded, record
