"""One trial: run the target stage with sampled settings (through the engine's runner, on
validation data), measure the variant it makes, and score it: the objectives' values, and the
constraint as Optuna's constraint value so the samplers steer away from infeasible settings.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from compress import faults, measure
from compress.config import did_you_mean, mask_secrets
from compress.context import Context, EpochHook
from compress.errors import ConfigError
from compress.tuning.constraint import drop_pp
from compress.tuning.space import suggest
from compress.tuning.spec import SearchSpec
from compress.tuning.storage import StudyLock
from compress.variants import StageResult, Variant

DERIVED_METRICS = ("file_bytes", "gzip_bytes", "latency_ms")


class TrialRejected(Exception):
    """The target refused a sampled configuration (a ConfigError), or a search trial's chain
    failed (a step refused the model, an export missed parity): the trial fails with its reason
    recorded, and the study goes on."""


# evaluate(sampled settings, the trial's work directory, the per-epoch hook) -> the variant the
# trial made and its metrics; raises ConfigError or TrialRejected when the trial cannot be scored
TrialEvaluator = Callable[[dict[str, Any], Path, "EpochHook | None"], tuple[Variant, dict[str, Any]]]


class Objective:
    """``study.optimize``'s callable; counts the trials the target rejected in ``rejected``."""

    def __init__(
        self,
        cfg: SearchSpec,
        ctx: Context,
        out_dir: Path,
        reference: float | None,
        lock: StudyLock,
        evaluate: TrialEvaluator | None = None,
    ):
        self.cfg, self.ctx, self.out_dir, self.reference, self.lock = cfg, ctx, out_dir, reference, lock
        self.evaluate = evaluate or stage_trial(cfg, ctx)
        self.rejected = 0
        self.sign = 1.0 if cfg.directions[0] == "maximize" else -1.0

    def __call__(self, trial: optuna.Trial) -> list[float]:
        self.lock.release()  # the trial exists now: other workers may count it and go on
        cfg, ctx = self.cfg, self.ctx
        params = {path: suggest(trial, path, entry, cfg.target_config) for path, entry in cfg.space.items()}
        trial_dir = self.out_dir / "trials" / f"{trial.number:05d}"
        faults.checkpoint(f"{cfg.label}:trial{trial.number}")
        on_epoch = self._reporter(trial) if cfg.pruner != "none" else None
        tic = time.perf_counter()
        try:
            try:
                variant, metrics = self.evaluate(params, trial_dir, on_epoch)
            except (ConfigError, TrialRejected) as exc:
                self.rejected += 1
                trial.set_user_attr("rejected", mask_secrets(str(exc)))
                ctx.log.warning("%s: trial %d rejected by %s: %s", cfg.label, trial.number, cfg.target, exc)
                raise TrialRejected(str(exc)) from None
        finally:
            if not cfg.keep_trials:
                shutil.rmtree(trial_dir, ignore_errors=True)
        values = [number(metrics, m, cfg, variant) for m in cfg.metrics]
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("seconds", round(time.perf_counter() - tic, 2))
        feasible, verdict = True, ""
        if cfg.constraint is not None:
            value = number(metrics, cfg.constraint.metric, cfg, variant)
            drop = drop_pp(self.reference, value, cfg.constraint)
            excess = cfg.constraint.excess(drop, slack=cfg.constraint.trial_slack_pp)
            feasible = excess <= 0
            trial.set_constraint("accuracy_drop", excess)  # Optuna's convention: <= 0 is feasible
            trial.set_user_attr("constraint", [excess])
            trial.set_user_attr("drop", drop)
            unit = "%" if cfg.constraint.relative else "pp"
            state = "feasible" if feasible else "infeasible"
            verdict = f" ({cfg.constraint.metric} drop {drop:.3g} {unit}: {state})"
        trial.set_user_attr("feasible", feasible)
        ctx.log.info(
            "%s: trial %d: %s -> %s%s",
            cfg.label,
            trial.number,
            metrics.get("recipe") or ", ".join(f"{k}={_short(v)}" for k, v in params.items()),
            ", ".join(f"{m} {v:.6g}" for m, v in zip(cfg.metrics, values, strict=True)),
            verdict,
        )
        return values

    def _reporter(self, trial: optuna.Trial) -> Callable[[int, dict[str, Any]], None]:
        steps = [0]

        def on_epoch(epoch: int, row: dict[str, Any]) -> None:
            value = row.get("val_accuracy")
            if value is None:
                return
            steps[0] += 1  # counts every epoch the target trains, across its fit() calls
            trial.report(self.sign * float(value), steps[0])
            if row.get("epoch") == row.get("epochs"):
                return  # the last epoch of this fit: nothing left to save by stopping here
            if trial.should_prune():
                self.ctx.log.info(
                    "%s: trial %d pruned after epoch %d (validation accuracy %.4f)",
                    self.cfg.label,
                    trial.number,
                    steps[0],
                    value,
                )
                raise optuna.TrialPruned(f"validation accuracy {value:.4f} after epoch {steps[0]}")

        return on_epoch


def stage_trial(cfg: SearchSpec, ctx: Context) -> TrialEvaluator:
    """The tune stage's trial: the target stage with the short budget and the sampled settings,
    scored on the variant it makes."""

    def evaluate(params: dict[str, Any], trial_dir: Path, on_epoch: EpochHook | None) -> tuple[Variant, dict]:
        result = ctx.run_stage(cfg.target, {**cfg.trial_overrides, **params}, trial_dir, on_epoch)
        variant = scored_variant(result, cfg)
        return variant, variant_metrics(variant, cfg, ctx)

    return evaluate


def scored_variant(result: StageResult, cfg: SearchSpec) -> Variant:
    """The variant of the target's result that the objectives score (``variant:``, or its only one)."""
    names = [v.name for v in result.variants]
    if cfg.variant is not None:
        if cfg.variant not in names:
            raise ConfigError(
                f"stage {cfg.label!r}: variant: {cfg.target!r} made {', '.join(names) or 'no variant'}, "
                f"not {cfg.variant!r}"
            )
        return result.variants[names.index(cfg.variant)]
    if len(names) != 1:
        raise ConfigError(
            f"stage {cfg.label!r}: stage {cfg.target!r} made {len(names)} variants "
            f"({', '.join(names)}); say which one to score with variant:"
        )
    return result.variants[0]


def variant_metrics(variant: Variant, cfg: SearchSpec, ctx: Context) -> dict[str, Any]:
    """The variant's scalar metrics, plus file size / gzip size / latency when asked for."""
    metrics = {
        k: v for k, v in variant.metrics.items() if isinstance(v, int | float | str | bool) or v is None
    }
    wanted = set(cfg.metrics) | ({cfg.constraint.metric} if cfg.constraint else set())
    for name in wanted & set(DERIVED_METRICS):
        if name in metrics:
            continue
        if name == "file_bytes":
            metrics[name] = measure.file_size(Path(variant.file))
        elif name == "gzip_bytes":
            metrics[name] = measure.gzip_size(Path(variant.file))
        else:
            metrics[name] = _latency_ms(variant, ctx)
    return metrics


def _latency_ms(variant: Variant, ctx: Context) -> float:
    """Median batch-1 latency of the torch model on one CPU thread (a quick, relative measure)."""
    model, _ = variant.load_torch()
    model.eval()
    bundle = ctx.data()
    sample = bundle.normalize(bundle.train.x[:1])
    with measure.torch_threads(1), torch.inference_mode():
        return measure.time_latency(lambda: model(sample), 1, warmup=5, repeats=30, min_seconds=0.2).p50_ms


def number(metrics: dict[str, Any], name: str, cfg: SearchSpec, variant: Variant) -> float:
    """``metrics[name]`` as a float; a ConfigError listing the numeric metrics if it is not one."""
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        shown = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, int | float)))
        raise ConfigError(
            f"stage {cfg.label!r}: metric {name!r} is not measured on variant {variant.name!r} made by "
            f"{cfg.target!r}{did_you_mean(name, metrics)}; its numeric metrics: {shown}; the tune stage "
            f"also measures {', '.join(DERIVED_METRICS)}"
        )
    return float(value)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)
