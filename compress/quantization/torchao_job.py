"""The PyTorch backend of the quantize stage: one parent's dynamic and static int8 programs made with
torchao, saved as ``torch.export`` programs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from compress.quantization import evaluate, torchao
from compress.quantization import search as fallbacks
from compress.quantization.job import (
    Job,
    accuracy_step,
    log_variant,
    quantized_variant,
    test_accuracy,
    variant_metrics,
    variant_record,
)
from compress.variants import Variant


@dataclass
class _Fp32Parent:
    """The parent as every mode compares against it, measured once per parent: the eager fp32
    model, its accuracies and file sizes, its weight modules and the model static calibrates."""

    model: nn.Module
    val: float | None
    test: dict[str, Any]
    sizes: dict[str, int]
    weight_modules: list[str]
    calibrated: nn.Module  # the BatchNorm-adapted copy for static, else the parent itself


def quantize_with_torchao(job: Job) -> list[tuple[Variant | None, dict[str, Any]]]:
    """Every mode of one parent; the fp32 reference (accuracies, exported size, the model static
    calibrates) is measured once here and shared by all modes."""
    cfg, bundle, log = job.cfg, job.bundle, job.ctx.log
    model, sample2 = job.model.cpu().eval(), job.sample[:2]
    has_val = len(bundle.val) > 0
    fp32_predict = torchao.torch_predictor(model)
    parent_val = evaluate.accuracy_of(fp32_predict, bundle, bundle.val)["accuracy"] if has_val else None
    parent_test = test_accuracy(job, lambda split: evaluate.accuracy_of(fp32_predict, bundle, split))
    pdir = job.out_dir / job.parent.name
    try:
        torchao.save_exported(model, sample2, pdir / "fp32.pt2")
        fp32_sizes = evaluate.file_sizes(pdir / "fp32.pt2")
    except Exception as exc:  # size of the parent in the same format is a nice-to-have
        log.warning("quantize: cannot save %s as an exported program (%s)", job.parent.name, exc)
        fp32_sizes = evaluate.file_sizes(job.parent.file)
    weight_modules = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    # static calibration starts from the parent with re-estimated BatchNorm statistics (or the parent)
    calibrated = job.calibration_model().cpu().eval() if "static" in cfg.modes else model
    parent = _Fp32Parent(model, parent_val, parent_test, fp32_sizes, weight_modules, calibrated)
    return [_quantize_mode(job, mode, parent) for mode in cfg.modes]


def _quantize_mode(job: Job, mode: str, parent: _Fp32Parent) -> tuple[Variant | None, dict[str, Any]]:
    """One variant: quantized, saved as an exported program (or not, which is recorded), measured."""
    cfg, bundle = job.cfg, job.bundle
    has_val = len(bundle.val) > 0
    name = cfg.output_name(job.parent.name, mode)
    if mode == "static":
        quantized, path_used, excluded, tries, sensitivity = _static_program(job, parent)
    else:
        quantized, path_used, tries = _unsearched_program(job, mode, parent)
        excluded, sensitivity = [], []
    file = job.out_dir / f"{name}.pt2"
    shipped, save_error = _save(job, name, quantized, file)
    predict = torchao.torch_predictor(shipped)
    val = evaluate.accuracy_of(predict, bundle, bundle.val)["accuracy"] if has_val else None
    test = test_accuracy(job, lambda split: evaluate.accuracy_of(predict, bundle, split))
    with evaluate.torch_threads(cfg.latency.threads):
        fp32_ms, int8_ms = evaluate.compare_latency(
            [evaluate.torch_runner(parent.model, job.sample), evaluate.torch_runner(shipped, job.sample)],
            rounds=cfg.latency.rounds,
            runs=cfg.latency.runs,
        )
    sizes = evaluate.file_sizes(file) if save_error is None else {"bytes": None, "gzip_bytes": None}
    metrics = variant_metrics(
        job,
        mode,
        val,
        test,
        parent.val,
        parent.test,
        sizes,
        parent.sizes,
        fp32_ms,
        int8_ms,
        excluded,
        parent.weight_modules,
    )
    metrics["runtime"] = "pytorch eager (torch.export program)"
    metrics["saved"] = save_error is None
    if save_error:
        metrics["save_error"] = save_error
    log_variant(job.ctx.log, name, metrics)
    searches = {"accuracy_tries": [t.to_json() for t in tries], "sensitivity": sensitivity}
    return _torchao_variant(job, mode, name, file, path_used, metrics, excluded, searches, save_error)


def _static_quantized(job: Job, calibrated: nn.Module, excluded: list[str]) -> nn.Module:
    """The PT2E static int8 program with ``excluded`` modules left in fp32."""
    return torchao.pt2e_static(
        calibrated,
        job.sample[:2],
        job.images,
        excluded,
        job.cfg.effective_reduce_range,
        job.cfg.calibration.batch_size,
    )


def _static_val_accuracy(job: Job, calibrated: nn.Module, excluded: list[str]) -> float:
    """Validation accuracy of one static trial, for the accuracy-aware fallback."""
    quantized = _static_quantized(job, calibrated, excluded)
    return evaluate.accuracy_of(torchao.torch_predictor(quantized), job.bundle, job.bundle.val)["accuracy"]


def _static_program(
    job: Job, parent: _Fp32Parent
) -> tuple[nn.Module, str, list[str], list[fallbacks.Try], list[dict[str, Any]]]:
    """Static int8 after the accuracy fallback chose the modules to keep in fp32: the program, its
    recipe, the kept modules, the tries and the sensitivity log."""
    has_val = len(job.bundle.val) > 0
    val_accuracy = partial(_static_val_accuracy, job, parent.calibrated)
    excluded, tries, sensitivity = accuracy_step(
        job.cfg, "static", parent.weight_modules, val_accuracy, parent.val, has_val
    )
    quantized = _static_quantized(job, parent.calibrated, excluded)
    path_used = "torchao PT2E: torch.export + prepare_pt2e/convert_pt2e, X86InductorQuantizer (static)"
    return quantized, path_used, excluded, tries, sensitivity


def _unsearched_program(
    job: Job, mode: str, parent: _Fp32Parent
) -> tuple[nn.Module, str, list[fallbacks.Try]]:
    """Weight-only or dynamic int8: no fallback, so at most one measured try (with a validation split)."""
    bundle, sample2 = job.bundle, job.sample[:2]
    make = torchao.torchao_weight_only if mode == "weight-only" else torchao.torchao_dynamic
    quantized, path_used = make(parent.model, sample2)
    tries: list[fallbacks.Try] = []
    if len(bundle.val) > 0:
        acc = evaluate.accuracy_of(torchao.torch_predictor(quantized), bundle, bundle.val)["accuracy"]
        ok = fallbacks.meets(parent.val, acc, job.cfg.tolerance)
        tries = [fallbacks.Try([], acc, fallbacks.drop_pp(parent.val, acc), ok, f"{mode}: no fallback")]
    return quantized, path_used, tries


def _save(job: Job, name: str, quantized: nn.Module, file: Path) -> tuple[nn.Module, str | None]:
    """Save ``quantized`` as an exported program: the program that ships (the reloaded one, or the
    in-memory one when saving fails) and the save error, recorded so the run goes on without the file."""
    try:
        return torchao.save_exported(quantized, job.sample[:2], file), None
    except Exception as exc:  # recorded in the metrics: the run goes on without this file
        first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        save_error = f"{type(exc).__name__}: {first_line}"
        job.ctx.log.warning("quantize: %s cannot be saved as an exported program: %s", name, save_error)
        file.unlink(missing_ok=True)
        return quantized, save_error


def _torchao_variant(
    job: Job,
    mode: str,
    name: str,
    file: Path,
    path_used: str,
    metrics: dict[str, Any],
    excluded: list[str],
    searches: dict[str, Any],
    save_error: str | None,
) -> tuple[Variant | None, dict[str, Any]]:
    """The stage's record of one variant and its ``Variant`` (None when the file could not be saved);
    ``searches`` holds the accuracy tries and sensitivity log in the record's key order."""
    record = variant_record(job, name, mode, path_used, metrics, **searches, latency_search=[])
    if save_error:
        record["save_error"] = save_error
    if save_error is not None:
        return None, record
    variant = quantized_variant(
        job,
        name,
        "pt2",
        file,
        metrics,
        {
            "backend": "pytorch",
            "mode": mode,
            "path": path_used,
            "fp32_layers": excluded,
            "load": "torch.export.load(file).module()",
        },
    )
    return variant, record
