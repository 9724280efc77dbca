"""Modes of the pytorch backend (torchao), saved as ``torch.export`` programs: ``static`` (PT2E
with the X86 inductor quantizer, calibrated on training images, with the accuracy-aware fallback),
``dynamic`` and ``weight-only`` (``quantize_``, no calibration and no fallback)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from compress.quantization import evaluate, search, torchao
from compress.quantization.finish import Quantized, Reference
from compress.quantization.job import Job

STATIC_PATH = "torchao PT2E: torch.export + prepare_pt2e/convert_pt2e, X86InductorQuantizer (static)"


@dataclass
class TorchParent:
    """The parent as every mode compares against it, measured once per parent: the eager fp32
    model and its reference numbers, its weight modules and the model static calibrates."""

    model: nn.Module
    ref: Reference
    weight_modules: list[str]
    calibrated: nn.Module  # the BatchNorm-adapted copy for static, else the parent itself

    @classmethod
    def prepare(cls, job: Job) -> TorchParent:
        """Score the eager parent, size it as an exported program (its own file if that fails)."""
        log, model = job.ctx.log, job.model.cpu().eval()
        val, test = job.accuracies(partial(evaluate.accuracy_of, torchao.torch_predictor(model), job.bundle))
        pdir = job.out_dir / job.parent.name
        try:
            torchao.save_exported(model, job.sample[:2], pdir / "fp32.pt2")
            sizes = evaluate.file_sizes(pdir / "fp32.pt2")
        except Exception as exc:  # size of the parent in the same format is a nice-to-have
            log.warning("quantize: cannot save %s as an exported program (%s)", job.parent.name, exc)
            sizes = evaluate.file_sizes(job.parent.file)
        weight_modules = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        # static calibration starts from the parent with re-estimated BatchNorm statistics (or the parent)
        calibrated = job.calibration_model().cpu().eval() if "static" in job.cfg.modes else model
        threads = job.cfg.latency.threads
        ref = Reference(val, test, sizes, evaluate.torch_runner(model, job.sample), torch_threads=threads)
        return cls(model, ref, weight_modules, calibrated)


def quantize(job: Job, mode: str, parent: TorchParent) -> Quantized:
    """One variant: quantized (static after its accuracy fallback), then saved as an exported
    program, or not, which is recorded and leaves the variant out of the stage's outputs."""
    name = job.cfg.output_name(job.parent.name, mode)
    if mode == "static":
        val_accuracy = partial(_static_val_accuracy, job, parent.calibrated)
        candidates = parent.weight_modules
    else:
        make = torchao.torchao_weight_only if mode == "weight-only" else torchao.torchao_dynamic
        quantized, path_used = make(parent.model, job.sample[:2])
        val_accuracy = partial(_val_accuracy, job, quantized)  # nothing is kept in fp32 here
        candidates = []
    excluded: list[str] = []
    tries: list[search.Try] = []
    sensitivity: list[dict[str, Any]] = []
    if job.has_val:
        excluded, tries, sensitivity = search.accuracy_step(
            mode, job.cfg.tolerance, candidates, val_accuracy, parent.ref.val
        )
    if mode == "static":
        quantized, path_used = _static_quantized(job, parent.calibrated, excluded), STATIC_PATH
    file = job.out_dir / f"{name}.pt2"
    shipped, save_error = _save(job, name, quantized, file)
    record: dict[str, Any] = {
        "accuracy_tries": [t.to_json() for t in tries],
        "sensitivity": sensitivity,
        "latency_search": [],
    }
    metrics: dict[str, Any] = {"runtime": "pytorch eager (torch.export program)", "saved": save_error is None}
    if save_error:
        metrics["save_error"] = record["save_error"] = save_error
    return Quantized(
        mode=mode,
        name=name,
        file=file if save_error is None else None,
        file_format="pt2",
        path_used=path_used,
        accuracy=partial(evaluate.accuracy_of, torchao.torch_predictor(shipped), job.bundle),
        runner=evaluate.torch_runner(shipped, job.sample),
        excluded=excluded,
        weight_layers=parent.weight_modules,
        metrics=metrics,
        record=record,
        info={
            "backend": "pytorch",
            "mode": mode,
            "path": path_used,
            "fp32_layers": excluded,
            "load": "torch.export.load(file).module()",
        },
    )


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
    return _val_accuracy(job, _static_quantized(job, calibrated, excluded), excluded)


def _val_accuracy(job: Job, program: nn.Module, excluded: list[str]) -> float:
    """Validation accuracy of a quantized program (``excluded`` is already part of it)."""
    return evaluate.accuracy_of(torchao.torch_predictor(program), job.bundle, job.bundle.val)["accuracy"]


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
