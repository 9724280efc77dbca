"""Modes ``qat`` and ``auto`` (onnxruntime): one parent fine-tuned against int8 (``qat``), or
calibrated first and fine-tuned only when that misses the tolerance (``auto``), shipped as a QDQ
ONNX whose int8 kernels onnxruntime is asked to confirm."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.distillation.teacher import Distillation, teacher_logits
from compress.models import load_checkpoint
from compress.quantization import evaluate, qat
from compress.quantization.finish import Quantized, Reference
from compress.quantization.job import Job
from compress.quantization.modes.onnxruntime import OnnxParent
from compress.quantization.search import Try
from compress.ship.files import parity
from compress.training import FitSettings, fit
from compress.training_defaults import DEFAULT_BATCH

QAT_MODES = ("qat", "auto")
PARITY_SAMPLE = 256
PARITY_SHARE = 0.01  # int8 against its own float simulation: 1 % of the largest logit, as for int8 targets

Made = tuple[str, nn.Module, Path, float | None]  # (method, program, file, val accuracy)


@dataclass
class _ParityBound:
    parity_atol: float
    min_top1_agreement: float = 0.99
    threads: int = 1


def weight_bits(job: Job) -> int:
    """The weight grid: the configured bits, at most 7 where full-range int8 would clip
    (``reduce_range``; see ``measure.int8_saturates``)."""
    return min(job.cfg.qat.weight_bits, 7) if job.cfg.effective_reduce_range else job.cfg.qat.weight_bits


def quantize_aware(job: Job, mode: str, parent: OnnxParent) -> Quantized:
    """One ``qat`` or ``auto`` variant: the candidates are measured on validation, the better one
    ships, and its int8 kernels and parity with its PyTorch program are checked and recorded."""
    cfg, bundle = job.cfg, job.bundle
    name = cfg.output_name(job.parent.name, mode)
    work = job.work_dir(name)
    final = job.out_dir / f"{name}.onnx"
    candidates, training = _candidates(job, mode, parent.ref, name, work)
    method, converted, chosen, val = _choose(job, mode, name, candidates.made)
    # every candidate's test accuracy, for the record only (the choice above saw validation alone)
    tested = [job.test_accuracy(partial(evaluate.onnx_accuracy, m[2], bundle)) for m in candidates.made]
    test = tested[[m[0] for m in candidates.made].index(method)]
    os.replace(chosen, final)
    metrics = _checked_metrics(job, name, method, final, converted, training)
    if mode == "auto":
        metrics.update(_auto_metrics(candidates.tries, tested))
    path_used = _path_used(job, method)
    return Quantized(
        mode=mode,
        name=name,
        file=final,
        file_format="onnx",
        path_used=path_used,
        accuracy=partial(evaluate.onnx_accuracy, final, bundle),
        runner=evaluate.onnx_runner(final, job.sample, cfg.latency.threads),
        scored=(val, test),  # the chosen file was scored on validation and test above
        metrics=metrics,
        record={
            "accuracy_tries": [
                {**t.to_json(), "method": m[0], "test_accuracy": r["accuracy"]}
                for t, m, r in zip(candidates.tries, candidates.made, tested, strict=True)
            ],
            "sensitivity": [],
            "latency_search": [],
            "settings": cfg.qat.model_dump(mode="json"),
        },
        info={
            "backend": "onnxruntime",
            "mode": mode,
            "method": method,
            "path": path_used,
            "fp32_onnx": str(parent.fp32.relative_to(job.out_dir)),
            "fp32_layers": [],
        },
    )


def _checked_metrics(
    job: Job, name: str, method: str, final: Path, converted: nn.Module, training: dict[str, Any] | None
) -> dict[str, Any]:
    """What QAT adds to the metrics: how the shipped file was made, and whether onnxruntime runs
    it with int8 kernels and agrees with the PyTorch program it was exported from (warned if not)."""
    bundle = job.bundle
    kernels = qat.int8_kernels(final, job.work_dir(name) / "optimized.onnx")
    checked = _parity(converted, final, bundle.normalize(bundle.test.x[:PARITY_SAMPLE]))
    if not kernels:
        job.ctx.log.warning(
            "quantize: onnxruntime runs %s without int8 kernels (no QLinear/QGemm after fusion)", name
        )
    if not checked["ok"]:
        job.ctx.log.warning("quantize: %s differs from its PyTorch program: %s", name, checked["error"])
    return {
        "runtime": "onnxruntime",
        "quantization_method": method,
        "weight_bits": weight_bits(job),
        "reduce_range": job.cfg.effective_reduce_range,
        "calibration_images": len(job.images) if method == "ptq" else 0,
        "calibration_method": "minmax (torchao X86, observers)" if method == "ptq" else None,
        "int8_kernels": kernels,
        "runs_in_int8": bool(kernels),
        "qdq_parity": checked,
        "qat": training,
    }


@dataclass
class _Candidates:
    """The int8 programs one mode exported and measured, in order (PTQ first under ``auto``, then
    QAT), so the choice and the record see every try with its file and validation accuracy."""

    job: Job
    ref: Reference
    work: Path
    meta: dict[str, str]
    tries: list[Try] = field(default_factory=list)
    made: list[Made] = field(default_factory=list)

    def measure(self, method: str, converted: nn.Module, note: str) -> bool:
        """Export ``converted`` as QDQ ONNX and score it on validation; whether it meets the tolerance."""
        bundle = self.job.bundle
        file = self.work / f"{method}.onnx"
        qat.export_qdq(converted, self.job.sample[:2], file, self.meta)
        acc = evaluate.onnx_accuracy(file, bundle, bundle.val)["accuracy"] if self.job.has_val else None
        self.tries.append(Try.measured(self.ref.val, acc, self.job.cfg.tolerance, note))
        self.made.append((method, converted, file, acc))
        return self.tries[-1].meets


def _candidates(
    job: Job, mode: str, ref: Reference, name: str, work: Path
) -> tuple[_Candidates, dict[str, Any] | None]:
    """``auto`` calibrates first and trains only when PTQ misses the tolerance; ``qat`` always
    trains. Returns the measured candidates and the training summary (None without training)."""
    cfg, bundle, log = job.cfg, job.bundle, job.ctx.log
    meta = {"compress.variant": name, "preprocessing": json.dumps(bundle.preprocessing())}
    candidates = _Candidates(job, ref, work, meta)
    training: dict[str, Any] | None = None
    if mode == "auto":
        converted = qat.ptq(
            job.calibration_model(), job.sample[:2], job.images, weight_bits(job), cfg.calibration.batch_size
        )
        ok = candidates.measure("ptq", converted, "static PTQ (the QAT quantizer, calibrated, no training)")
        log.info(
            "quantize: %s static PTQ val %s (%s the %.2f pp tolerance)%s",
            name,
            f"{candidates.tries[0].val_accuracy:.4f}" if job.has_val else "n/a",
            "within" if ok else "misses",
            cfg.tolerance,
            "" if ok else ": quantization-aware training follows",
        )
    if mode == "qat" or not candidates.tries[0].meets:
        converted, training = _train(job, name, work)
        candidates.measure("qat", converted, f"QAT, {cfg.qat.epochs} epoch(s)")
    return candidates, training


def _choose(job: Job, mode: str, name: str, made: list[Made]) -> Made:
    """auto ships QAT only when it beats PTQ on the validation split: training can also lose."""
    chosen = max(made, key=lambda m: -1.0 if m[3] is None else m[3]) if job.has_val else made[-1]
    if mode == "auto" and len(made) == 2 and chosen[0] == "ptq":
        job.ctx.log.warning(
            "quantize: %s: QAT did not beat static PTQ on the validation split; PTQ ships", name
        )
    return chosen


def _auto_metrics(tries: list[Try], tested: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``auto`` adds: how PTQ scored, whether QAT was needed and how it scored."""
    return {
        "ptq_val_accuracy": tries[0].val_accuracy,
        "ptq_drop_val_pp": round(tries[0].drop_pp, 4) if tries[0].val_accuracy is not None else None,
        "qat_needed": not tries[0].meets,
        "qat_val_accuracy": tries[1].val_accuracy if len(tries) == 2 else None,
        "ptq_test_accuracy": tested[0]["accuracy"],
        "qat_test_accuracy": tested[1]["accuracy"] if len(tested) == 2 else None,
    }


def _path_used(job: Job, method: str) -> str:
    """The human-readable recipe recorded with the variant."""
    return (
        "torchao PT2E X86InductorQuantizer "
        + ("prepare_qat_pt2e + fine-tuning" if method == "qat" else "prepare_pt2e + calibration")
        + f" ({weight_bits(job)}-bit weights), convert_pt2e, QDQ ONNX"
    )


def _train(job: Job, name: str, work: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune the fake-quantized parent (optionally against its fp32 self), then convert."""
    settings, bundle, ctx = job.cfg.qat, job.bundle, job.ctx
    # the eager model adapted: in the exported graph BatchNorm is no longer a module to re-estimate
    prepared = qat.prepare(job.calibration_model(), job.sample[:2], weight_bits(job))
    per_epoch = math.ceil(len(bundle.train) / (settings.batch_size or DEFAULT_BATCH))
    steps = settings.epochs * per_epoch
    checkpoint = work / "fit" / "checkpoint.pt"  # a resumed fit: count the steps it already took
    done = int(load_checkpoint(checkpoint)["epoch"]) * per_epoch if checkpoint.is_file() else 0
    freezer = qat.Freezer(
        prepared, round(settings.freeze_observers_at * steps), round(settings.freeze_bn_at * steps), done
    )
    keep_zeros = qat.keep_zeros(prepared)

    def after_step() -> None:
        keep_zeros()
        freezer()

    distill = None
    if settings.distill is not None:
        teacher = copy.deepcopy(job.calibration_model()).eval()
        logits = teacher_logits(teacher, bundle, ctx.device) if settings.augment == "none" else None
        distill = Distillation(teacher, settings.distill.temperature, settings.distill.alpha, logits)
    run = FitSettings(
        settings,
        ctx.device,
        ctx.seed,
        work / "fit",
        desc=f"qat {name}",
        distill=distill,
        after_step=after_step,
    )
    result = fit(prepared, bundle, run)
    history = result.history
    summary = {
        "epochs": settings.epochs,
        "steps": steps,
        "seconds": round(result.seconds, 2),
        "observers_frozen_at_step": freezer.frozen["observers"],
        "batch_norm_frozen_at_step": freezer.frozen["batch_norm"],
        "distill": settings.distill.model_dump() if settings.distill is not None else None,
        "val_accuracy_fake_quant": history[-1]["val_accuracy"] if history else None,
        "history": [
            {k: row.get(k) for k in ("epoch", "train_loss", "val_accuracy", "lr")} for row in history
        ],
    }
    return qat.convert(prepared), summary


def _parity(converted: nn.Module, path: Path, images: torch.Tensor) -> dict[str, Any]:
    """The QDQ file in onnxruntime against the converted PyTorch program it was exported from."""
    with torch.no_grad():
        reference = converted(images).numpy()
    produced = evaluate.onnx_predictor(path)(images)
    bound = PARITY_SHARE * float(np.max(np.abs(reference)))
    return parity(reference, np.asarray(produced), _ParityBound(bound))
