"""The PyTorch backend of the quantize stage: one parent's dynamic and static int8 programs made with
torchao, saved as ``torch.export`` programs."""

from __future__ import annotations

from typing import Any

from torch import nn

from compress.quantization import evaluate, torchao
from compress.quantization import search as fallbacks
from compress.quantization.job import Job, accuracy_step, log_variant, test_accuracy, variant_metrics
from compress.variants import Variant


def quantize_with_torchao(job: Job) -> list[tuple[Variant | None, dict[str, Any]]]:
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
    results = []
    for mode in cfg.modes:
        name = cfg.output_name(job.parent.name, mode)
        tries: list[fallbacks.Try] = []
        sensitivity: list[dict[str, Any]] = []
        excluded: list[str] = []
        if mode == "static":

            def val_accuracy(ex: list[str]) -> float:
                quantized = torchao.pt2e_static(
                    calibrated,
                    sample2,
                    job.images,
                    ex,
                    cfg.effective_reduce_range,
                    cfg.calibration.batch_size,
                )
                return evaluate.accuracy_of(torchao.torch_predictor(quantized), bundle, bundle.val)[
                    "accuracy"
                ]

            excluded, tries, sensitivity = accuracy_step(
                cfg, mode, weight_modules, val_accuracy, parent_val, has_val
            )
            quantized = torchao.pt2e_static(
                calibrated,
                sample2,
                job.images,
                excluded,
                cfg.effective_reduce_range,
                cfg.calibration.batch_size,
            )
            path_used = (
                "torchao PT2E: torch.export + prepare_pt2e/convert_pt2e, X86InductorQuantizer (static)"
            )
        else:
            make = torchao.torchao_weight_only if mode == "weight-only" else torchao.torchao_dynamic
            quantized, path_used = make(model, sample2)
            if has_val:
                acc = evaluate.accuracy_of(torchao.torch_predictor(quantized), bundle, bundle.val)["accuracy"]
                ok = fallbacks.meets(parent_val, acc, cfg.tolerance)
                tries = [
                    fallbacks.Try([], acc, fallbacks.drop_pp(parent_val, acc), ok, f"{mode}: no fallback")
                ]
        file = job.out_dir / f"{name}.pt2"
        save_error = None
        try:
            shipped = torchao.save_exported(quantized, sample2, file)
        except Exception as exc:  # recorded in the metrics: the run goes on without this file
            first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            save_error = f"{type(exc).__name__}: {first_line}"
            log.warning("quantize: %s cannot be saved as an exported program: %s", name, save_error)
            file.unlink(missing_ok=True)
            shipped = quantized
        predict = torchao.torch_predictor(shipped)
        val = evaluate.accuracy_of(predict, bundle, bundle.val)["accuracy"] if has_val else None
        test = test_accuracy(job, lambda split, predict=predict: evaluate.accuracy_of(predict, bundle, split))
        with evaluate.torch_threads(cfg.latency.threads):
            fp32_ms, int8_ms = evaluate.compare_latency(
                [evaluate.torch_runner(model, job.sample), evaluate.torch_runner(shipped, job.sample)],
                rounds=cfg.latency.rounds,
                runs=cfg.latency.runs,
            )
        sizes = evaluate.file_sizes(file) if save_error is None else {"bytes": None, "gzip_bytes": None}
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
            weight_modules,
        )
        metrics["runtime"] = "pytorch eager (torch.export program)"
        metrics["saved"] = save_error is None
        if save_error:
            metrics["save_error"] = save_error
        log_variant(log, name, metrics)
        record = {
            "name": name,
            "parent": job.parent.name,
            "mode": mode,
            "path": path_used,
            "metrics": metrics,
            "accuracy_tries": [t.to_json() for t in tries],
            "sensitivity": sensitivity,
            "latency_search": [],
        }
        if save_error:
            record["save_error"] = save_error
        variant = None
        if save_error is None:
            variant = Variant(
                name=name,
                format="pt2",
                file=file,
                stage=cfg.label,
                parent=job.parent.name,
                metrics=metrics,
                info={
                    "backend": "pytorch",
                    "mode": mode,
                    "path": path_used,
                    "fp32_layers": excluded,
                    "load": "torch.export.load(file).module()",
                    "preprocessing": bundle.preprocessing(),
                },
            )
        results.append((variant, record))
    return results
