"""Stage ``tune``: an Optuna study over another stage's settings, scored on validation data.

The tune stage comes before its target in the pipeline. Each trial runs the target stage
(through ``ctx.run_stage``, handed in by the engine) with sampled settings and the short
``trial_overrides`` budget, on a dataset whose test split raises when read; the objectives are
metrics of the variant the target makes, and the accuracy constraint goes through Optuna's
constraints API, so infeasible trials are recorded but never chosen. The chosen settings go
back to the engine as ``StageResult.overrides``, and the target then runs once with its full
budget, the tuned values in its config and cache key.

Studies live in an RDB storage opened with ``load_if_exists``: by default an SQLite file in
this stage's work directory (kept by the engine when the process dies, so a re-run resumes);
with ``storage:``/``--storage`` any SQLAlchemy URL, shared by ``--worker`` processes. A lock
around "count trials, start one" keeps the number of finished trials at exactly ``n_trials``,
and heartbeats turn the trials of killed workers into retries.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import optuna
import pandas as pd
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from pydantic import Field, PrivateAttr, field_serializer, field_validator, model_validator
from tqdm import tqdm

from compress import faults, measure
from compress.config import StageConfig, StrictModel, did_you_mean
from compress.context import Context
from compress.errors import ArtifactError, CompressError, ConfigError
from compress.fileio import sha256_file, sha256_json, write_json
from compress.stages import stage
from compress.tuning import mask_secrets, with_settings
from compress.tuning.settings import value_at
from compress.tuning.storage import StudyLock, check_storage_url, driver_url
from compress.variants import StageResult, Variant

DERIVED_METRICS = ("file_bytes", "gzip_bytes", "latency_ms")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_SECONDS = 1.0


class SpaceEntry(StrictModel):
    """One setting's range: ``low``/``high`` (``log``, ``step``) or ``choices``."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(None, gt=0)
    choices: list[int | float | str | bool | None] | None = Field(None, min_length=1)
    type: Literal["int", "float"] | None = None

    @model_validator(mode="after")
    def _shape(self) -> SpaceEntry:
        if self.choices is not None:
            extra = [k for k in ("low", "high", "log", "step", "type") if k in self.model_fields_set]
            if extra:
                raise ValueError(f"give either choices or low/high, not both (also got {', '.join(extra)})")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices: [...])")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be less than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high)):
            raise ValueError("type int needs whole-number low and high")
        return self


class ConstraintConfig(StrictModel):
    """The tolerable loss: ``metric`` may drop at most ``max_drop_pp`` below ``against``'s.

    Absolute: percentage points of a 0..1 metric (0.1 means 99.20% -> 99.10% is the limit).
    Relative: percent of the reference value (0.1 means 0.1% of it).
    """

    metric: str = "val_accuracy"
    max_drop_pp: float = Field(ge=0, le=100)
    relative: bool = False
    against: str | None = None
    # Short trials under-rate a setting, so a trial may drop this much more and still be a
    # candidate; ``confirm`` then re-checks candidates against max_drop_pp at full budget.
    trial_slack_pp: float = Field(0.0, ge=0, le=100)


class TuneConfig(StageConfig):
    stage: Literal["tune"]
    target: str
    space: dict[str, SpaceEntry] = Field(min_length=1)
    trial_overrides: dict[str, Any] = Field(default_factory=dict)
    objectives: list[dict[Literal["maximize", "minimize"], str]] = Field(min_length=1, max_length=4)
    variant: str | None = None
    constraint: ConstraintConfig | None = None
    sampler: Literal["auto", "tpe", "nsga2", "random"] = "auto"
    pruner: Literal["none", "median", "hyperband"] = "none"
    n_trials: int = Field(20, ge=1, le=100_000)
    timeout: float | None = Field(None, gt=0)
    startup_trials: int | None = Field(None, ge=1, le=100_000)
    population_size: int | None = Field(None, ge=2, le=10_000)
    seed: int | None = None
    storage: str | None = None
    study_name: str | None = Field(None, min_length=1, max_length=200)
    selection: Literal["smallest_within_tolerance", "best"] = "smallest_within_tolerance"
    heartbeat_interval: int = Field(10, ge=1, le=3600)
    grace_period: int | None = Field(None, ge=1, le=86_400)
    max_retry: int = Field(3, ge=0, le=100)
    keep_trials: bool = False
    enqueue_default: bool = True
    # Re-run the best N candidates with the target's full budget (validation data only) and
    # choose the first that meets the constraint there.
    confirm: int = Field(0, ge=0, le=20)

    supports_workers: ClassVar[bool] = True
    _target: StageConfig | None = PrivateAttr(None)
    _inputs: list[str] | None = PrivateAttr(None)

    @field_validator("objectives")
    @classmethod
    def _one_direction_each(cls, value: list[dict[str, str]]) -> list[dict[str, str]]:
        for item in value:
            if len(item) != 1:
                raise ValueError("each objective is one 'maximize: METRIC' or 'minimize: METRIC'")
        metrics = [m for item in value for m in item.values()]
        if len(set(metrics)) != len(metrics):
            raise ValueError("the same metric appears twice")
        return value

    @field_validator("storage")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return check_storage_url(value) if value is not None else None

    @field_serializer("storage")
    def _masked(self, value: str | None) -> str | None:
        """Resolved configs, manifests and cache keys see the URL with its password masked."""
        return mask_secrets(value) if value else value

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        if self.from_ is not None:
            raise ValueError("from: a tune stage reads its target's inputs; remove 'from:'")
        if self.confirm and self.constraint is None:
            raise ValueError("confirm: re-checks the constraint at full budget; add a constraint:")
        if self.constraint is not None and self.constraint.trial_slack_pp and not self.confirm:
            raise ValueError(
                "constraint.trial_slack_pp admits settings that may miss the tolerance at full budget; "
                "set confirm: N (e.g. 1) so the chosen one is re-checked"
            )
        if self.pruner != "none" and len(self.objectives) > 1:
            raise ValueError("pruner: Optuna cannot prune multi-objective trials; use pruner: none")
        if self.sampler == "nsga2" and len(self.objectives) == 1 and self.constraint is None:
            pass  # allowed, if unusual
        return self

    # ------------------------------------------------------------ derived settings

    @property
    def directions(self) -> list[str]:
        return [next(iter(item)) for item in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [next(iter(item.values())) for item in self.objectives]

    @property
    def primary(self) -> int:
        """Index of the objective the selection rule ranks the feasible Pareto front by."""
        if self.selection == "best" or self.constraint is None:
            return 0
        return next((i for i, m in enumerate(self.metrics) if m != self.constraint.metric), 0)

    def selection_rule(self) -> str:
        feasible = (
            f"meeting the constraint ({self.constraint.metric} at most {self.constraint.max_drop_pp}"
            f"{'% relative' if self.constraint.relative else ' pp'} below the reference)"
            if self.constraint
            else "(no constraint: every complete trial is feasible)"
        )
        if len(self.objectives) == 1:
            return (
                f"the complete trial {feasible} with the best {self.directions[0]}d {self.metrics[0]}; "
                "ties go to the earlier trial"
            )
        i = self.primary
        return (
            f"{self.selection}: among the Pareto-optimal trials {feasible}, the one with the best "
            f"{self.directions[i]}d {self.metrics[i]}; ties go to the other objectives in order, "
            "then to the earlier trial"
        )

    def kind_of(self, path: str, entry: SpaceEntry, target: StageConfig) -> str:
        if entry.choices is not None:
            return "categorical"
        if entry.type is not None:
            return entry.type
        current = value_at(target, path)
        return "int" if isinstance(current, int) and not isinstance(current, bool) else "float"

    # ------------------------------------------------------------ checks against the pipeline

    def check(self, pipeline: Any) -> None:
        stages = pipeline.stages
        labels = [s.label for s in stages]
        me = labels.index(self.label) if self.label in labels else -1
        if self.target not in labels:
            raise ValueError(
                f"target: no stage named {self.target!r}{did_you_mean(self.target, labels)}; "
                f"stages: {', '.join(labels)}"
            )
        where = labels.index(self.target)
        target = stages[where]
        if getattr(target, "supports_workers", False):
            raise ValueError("target: a tune stage cannot tune another tune stage")
        if not target.tunable:
            raise ValueError(
                f"target: stage {self.target!r} ({target.stage}) has no tunable settings; a tune stage "
                "can target train, prune, distill or quantize stages"
            )
        if where <= me:
            raise ValueError(
                f"target: stage {self.target!r} must come after the tune stage (tune runs first and "
                "hands its choice to the target)"
            )
        available: list[str] = []
        for earlier in stages[: max(me, 0)]:
            available += earlier.produces(earlier.consumes(list(available)))
        needed = target.consumes(list(available))
        missing = [n for n in needed if n not in available]
        if missing:
            raise ValueError(
                f"target: stage {self.target!r} reads {', '.join(missing)}, which is made after the "
                "tune stage; move the tune stage after the stage that makes it"
            )
        if self.constraint is not None:
            against = self.constraint.against or (needed[0] if needed else None)
            if against is None:
                raise ValueError("constraint.against: name the variant whose accuracy is the reference")
            if against not in available:
                raise ValueError(
                    f"constraint.against: no variant {against!r} before the tune stage"
                    f"{did_you_mean(against, available)}; available: {', '.join(available) or 'none'}"
                )
        try:
            with_settings(target, self.trial_overrides, pipeline, where="trial_overrides: ")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        for path, entry in self.space.items():
            kind = self.kind_of(path, entry, target)
            ends = entry.choices if entry.choices is not None else [entry.low, entry.high]
            for value in ends:
                value = int(value) if kind == "int" else float(value) if kind == "float" else value
                try:
                    with_settings(target, {**self.trial_overrides, path: value}, pipeline)
                except ValueError as exc:
                    raise ValueError(
                        f"space.{path}: {value!r} is not a valid setting of stage {self.target!r}: {exc}"
                    ) from None
        self._target, self._inputs = target, needed

    def consumes(self, available: list[str]) -> list[str]:
        names = list(self._inputs or [])
        if self.constraint is not None and self.constraint.against and self.constraint.against not in names:
            names.append(self.constraint.against)
        return names

    def cache_extras(self, pipeline: Any) -> dict[str, Any]:
        """The target's own config is part of what a study found: editing it re-tunes."""
        target = self._target or next(s for s in pipeline.stages if s.label == self.target)
        return {"target": target.model_dump(mode="json", by_alias=True)}

    def against(self) -> str | None:
        if self.constraint is None:
            return None
        return self.constraint.against or (self._inputs[0] if self._inputs else None)


def drop_pp(reference: float, value: float, constraint: ConstraintConfig) -> float:
    """How far ``value`` is below ``reference``: percentage points, or percent of it when relative.

    Rounded to 1e-9 so a drop of exactly the tolerance (99.22% -> 99.12% is 0.1 pp, but
    0.100000000000000009 in binary floating point) meets it.
    """
    drop = (reference - value) * 100
    if constraint.relative:
        drop = drop / reference if reference else math.inf
    return round(drop, 9)


class TrialRejected(Exception):
    """The target refused a sampled configuration (a ConfigError): the trial fails, the study goes on."""


# ---------------------------------------------------------------- the stage


@stage("tune", TuneConfig, version=3)
def run(cfg: TuneConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    if ctx.run_stage is None:
        raise ArtifactError("the tune stage needs the engine's stage runner (ctx.run_stage)")
    started = time.perf_counter()
    url = driver_url(cfg.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}")
    private = cfg.storage is None
    if ctx.worker and private:
        raise ConfigError(
            f"stage {cfg.label!r}: --worker needs a storage every worker can reach: give "
            "--storage URL (e.g. postgresql://user@host/db) or storage: in the tune stage"
        )
    # the default database moves with the stage directory, so name it relative to that
    shown_url = "sqlite:///study.db (in the tune stage's directory)" if private else mask_secrets(url)
    study_name = cfg.study_name or _default_study_name(cfg, inputs, ctx)
    reference = _reference(cfg, ctx)
    bundle = ctx.data()
    test_reads_before = bundle.test_reads

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lock = None
    try:
        try:
            lock = StudyLock(url, study_name)
            with lock:
                storage = _open_storage(url, cfg)
                study = optuna.create_study(
                    storage=storage,
                    study_name=study_name,
                    directions=[d for d in cfg.directions],
                    load_if_exists=True,
                )
                if study.metric_names is None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        study.set_metric_names(cfg.metrics)  # labels for optuna-dashboard
                if cfg.enqueue_default and not study.trials:
                    _enqueue_default(study, cfg, ctx)
        except CompressError:
            raise
        except Exception as exc:  # driver missing, server down, bad URL: say so without the password
            first = mask_secrets(str(exc)).strip().splitlines()[0] if str(exc).strip() else ""
            hint = " (pip install psycopg2-binary)" if "psycopg2" in str(exc) else ""
            raise ConfigError(
                f"stage {cfg.label!r}: cannot open the study storage {shown_url}: "
                f"{type(exc).__name__}: {first}{hint}"
            ) from None
        if [d.name.lower() for d in study.directions] != cfg.directions:
            raise ConfigError(
                f"stage {cfg.label!r}: study {study_name!r} in {shown_url} has directions "
                f"{[d.name.lower() for d in study.directions]}, not {cfg.directions}; use another study_name"
            )
        if not lock.cross_process:
            ctx.log.warning(
                "%s: no cross-process lock for %s; with several workers a study may run a few "
                "trials more than n_trials",
                cfg.label,
                shown_url.split(":", 1)[0],
            )
        ctx.log.info(
            "%s: study %r in %s (%d trials so far), target %s, n_trials %d",
            cfg.label,
            study_name,
            shown_url,
            len(study.trials),
            cfg.target,
            cfg.n_trials,
        )
        if private and not ctx.worker:
            _recover_orphans(study, storage, cfg, ctx)
        seed = (cfg.seed if cfg.seed is not None else ctx.seed) + len(study.trials)
        if ctx.worker:
            seed += os.getpid()  # workers must not draw the same random start-up points
        study.sampler = _sampler(cfg, seed)
        study.pruner = _pruner(cfg)

        _optimize(study, lock, cfg, ctx, out_dir, reference, started)
        summary = _summarize(study, cfg, reference, study_name, shown_url, started)
        if cfg.confirm and not ctx.worker:  # workers only fill the study; the run that applies it confirms
            _confirm(study, summary, cfg, ctx, out_dir, reference)
            summary["elapsed_seconds"] = round(time.perf_counter() - started, 2)
    finally:
        if lock is not None:
            lock.close()
        optuna.logging.set_verbosity(verbosity)

    if not cfg.keep_trials:
        shutil.rmtree(out_dir / "trials", ignore_errors=True)
    test_reads = bundle.test_reads - test_reads_before
    summary["test_reads_during_tuning"] = test_reads
    if test_reads:
        raise RuntimeError(f"the test split was read {test_reads} times during tuning")
    write_json(out_dir / "study.json", summary)
    _trials_frame(summary).to_csv(out_dir / "trials.csv", index=False)
    chosen = summary["chosen"]
    overrides = {cfg.target: dict(chosen["params"])} if chosen else {}
    if chosen:
        ctx.log.info(
            "%s: chose trial %d (%s): %s",
            cfg.label,
            chosen["number"],
            ", ".join(f"{m} {v:.6g}" for m, v in zip(cfg.metrics, chosen["values"], strict=True)),
            ", ".join(f"{k}={v!r}" for k, v in chosen["params"].items()),
        )
    else:
        why = (
            f"none of the {len(summary['confirmation']['runs'])} candidate(s) met the constraint at "
            "full budget"
            if summary.get("confirmation", {}).get("runs")
            else f"no feasible trial among {summary['counts'].get('COMPLETE', 0)}"
        )
        ctx.log.warning("%s: %s; %s keeps its own settings", cfg.label, why, cfg.target)
    metrics: dict[str, Any] = {
        "study_name": study_name,
        "storage": shown_url,
        "target": cfg.target,
        "n_trials": cfg.n_trials,
        "trials_complete": summary["counts"].get("COMPLETE", 0),
        "trials_pruned": summary["counts"].get("PRUNED", 0),
        "trials_failed": summary["counts"].get("FAIL", 0),
        "trials_feasible": summary["feasible"],
        "selection": cfg.selection,
        "selection_rule": summary["selection_rule"],
        "chosen_trial": chosen["number"] if chosen else None,
        "reference": reference,
        "test_reads_during_tuning": test_reads,
        "tuning_seconds": summary["elapsed_seconds"],
        "confirmed": [r["number"] for r in summary.get("confirmation", {}).get("runs", [])],
    }
    if chosen:
        for metric, value in zip(cfg.metrics, chosen["values"], strict=True):
            metrics[f"chosen.{metric}"] = value
        for path, value in chosen["params"].items():
            metrics[f"tuned.{path}"] = value
    metrics["study"] = {k: v for k, v in summary.items() if k != "trials"}
    return StageResult(
        metrics=metrics,
        publish={"study.json": f"{cfg.label}.study.json", "trials.csv": f"{cfg.label}.trials.csv"},
        overrides=overrides,
    )


# ---------------------------------------------------------------- storage and study


def _open_storage(url: str, cfg: TuneConfig) -> RDBStorage:
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=cfg.heartbeat_interval,
            grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
        )


def _enqueue_default(study: optuna.Study, cfg: TuneConfig, ctx: Context) -> None:
    """Trial 0 evaluates the target's hand-set values, so the choice is never worse than them
    (on the trial budget) whenever they meet the constraint."""
    target = cfg._target
    if target is None:
        return
    params = {path: value_at(target, path) for path in cfg.space}
    for path, entry in cfg.space.items():
        value = params[path]
        inside = (
            value in entry.choices
            if entry.choices is not None
            else isinstance(value, int | float) and entry.low <= value <= entry.high
        )
        if not inside:
            ctx.log.info("%s: %s's own %s=%r is outside the space", cfg.label, cfg.target, path, value)
            return
    study.enqueue_trial(params, user_attrs={"default": True})


def _default_study_name(cfg: TuneConfig, inputs: list[Variant], ctx: Context) -> str:
    """Same search on the same inputs -> same study; n_trials and timeout may grow a study."""
    identity = {
        "tune": cfg.model_dump(
            mode="json",
            by_alias=True,
            exclude={"storage", "n_trials", "timeout", "study_name", "selection", "keep_trials"},
        ),
        "target": cfg.cache_extras(ctx.pipeline.config),
        "inputs": {v.name: sha256_file(v.file) for v in inputs},
        "seed": ctx.seed,
        "data": ctx.pipeline.config.data.model_dump(mode="json", exclude={"root", "download"}),
    }
    return f"{ctx.pipeline.name}.{cfg.label}.{sha256_json(identity)[:10]}"


def _reference(cfg: TuneConfig, ctx: Context) -> float | None:
    if cfg.constraint is None:
        return None
    name, metric = cfg.against(), cfg.constraint.metric
    variant = ctx.variants.get(name) if name else None
    value = variant.metrics.get(metric) if variant else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(
            f"stage {cfg.label!r}: constraint.metric {metric!r} is not measured on variant {name!r} "
            f"(its metrics: {', '.join(sorted(variant.metrics)) if variant else 'none'})"
        )
    return float(value)


def _sampler(cfg: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    """Constrained samplers read each trial's ``trial.set_constraint`` values (Optuna 5)."""
    kind = cfg.sampler if cfg.sampler != "auto" else ("nsga2" if len(cfg.objectives) > 1 else "tpe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "nsga2":
            population = cfg.population_size or max(4, min(50, cfg.n_trials // 3))
            return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
        startup = cfg.startup_trials or max(3, min(10, cfg.n_trials // 3))
        return optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed, multivariate=True)


def _pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, (cfg.startup_trials or 3) // 2))
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def _recover_orphans(study: optuna.Study, storage: RDBStorage, cfg: TuneConfig, ctx: Context) -> None:
    """Trials left RUNNING in this stage's own database belong to a killed run of this stage
    (the engine lets only one process run it): fail them and queue a retry, without waiting
    for their heartbeats to go stale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
            retry(study, storage.get_trial(trial._trial_id))
            ctx.log.info("%s: trial %d was cut short by a killed run; retrying it", cfg.label, trial.number)


# ---------------------------------------------------------------- the search


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return counts


def _optimize(
    study: optuna.Study,
    lock: StudyLock,
    cfg: TuneConfig,
    ctx: Context,
    out_dir: Path,
    reference: float | None,
    started: float,
) -> None:
    """Run trials until the study holds exactly n_trials finished (complete or pruned) ones.

    Under the lock: fail stale trials (killed workers), count, and start a trial only when
    finished + running + queued is below n_trials (or a queued retry is waiting). The trial
    releases the lock once Optuna has created it. When the rest are running elsewhere, wait
    for them, so every worker ends with the same, complete study.
    """
    deadline = started + cfg.timeout if cfg.timeout else math.inf
    rejected = 0
    counts = _counts(study)
    bar = tqdm(
        total=cfg.n_trials,
        initial=min(cfg.n_trials, counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]),
        desc=f"{cfg.label} trials",
        dynamic_ncols=True,
        leave=False,
    )
    objective = _Objective(cfg, ctx, out_dir, reference, lock)
    try:
        while True:
            lock.acquire()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                counts = _counts(study)
                done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
                bar.n = min(done, cfg.n_trials)
                bar.set_postfix_str(_best_text(study, cfg), refresh=True)
                if done >= cfg.n_trials:
                    break
                waiting, running = counts[TrialState.WAITING], counts[TrialState.RUNNING]
                start = time.perf_counter() < deadline and (waiting > 0 or done + running < cfg.n_trials)
                if start:
                    before = objective.rejected
                    study.optimize(objective, n_trials=1, catch=(TrialRejected,), gc_after_trial=False)
                    rejected += objective.rejected - before
                    if rejected > max(3, cfg.n_trials):
                        raise ConfigError(
                            f"stage {cfg.label!r}: {rejected} trials were rejected by stage "
                            f"{cfg.target!r} (see the log); narrow the search space"
                        )
                    continue
            finally:
                lock.release()
            if time.perf_counter() >= deadline and running == 0:
                break
            if time.perf_counter() >= deadline + 3600:
                break  # others have been running long past our budget: summarise what is there
            time.sleep(POLL_SECONDS)  # the remaining trials run in other workers
    finally:
        bar.close()


class _Objective:
    def __init__(
        self, cfg: TuneConfig, ctx: Context, out_dir: Path, reference: float | None, lock: StudyLock
    ):
        self.cfg, self.ctx, self.out_dir, self.reference, self.lock = cfg, ctx, out_dir, reference, lock
        self.rejected = 0
        self.sign = 1.0 if cfg.directions[0] == "maximize" else -1.0

    def __call__(self, trial: optuna.Trial) -> list[float]:
        self.lock.release()  # the trial exists now: other workers may count it and go on
        cfg, ctx = self.cfg, self.ctx
        params = {path: _suggest(trial, path, entry, cfg) for path, entry in cfg.space.items()}
        trial_dir = self.out_dir / "trials" / f"{trial.number:05d}"
        faults.checkpoint(f"tune:trial{trial.number}")
        on_epoch = self._reporter(trial) if cfg.pruner != "none" else None
        tic = time.perf_counter()
        try:
            try:
                result = ctx.run_stage(cfg.target, {**cfg.trial_overrides, **params}, trial_dir, on_epoch)
            except ConfigError as exc:
                self.rejected += 1
                trial.set_user_attr("rejected", mask_secrets(str(exc)))
                ctx.log.warning("%s: trial %d rejected by %s: %s", cfg.label, trial.number, cfg.target, exc)
                raise TrialRejected(str(exc)) from None
            variant = _scored_variant(result, cfg)
            metrics = _metrics(variant, cfg, ctx)
        finally:
            if not cfg.keep_trials:
                shutil.rmtree(trial_dir, ignore_errors=True)
        values = [_number(metrics, m, cfg, variant) for m in cfg.metrics]
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("seconds", round(time.perf_counter() - tic, 2))
        feasible, verdict = True, ""
        if cfg.constraint is not None:
            value = _number(metrics, cfg.constraint.metric, cfg, variant)
            drop = drop_pp(self.reference, value, cfg.constraint)
            excess = round(drop - cfg.constraint.max_drop_pp - cfg.constraint.trial_slack_pp, 9)
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
            ", ".join(f"{k}={_short(v)}" for k, v in params.items()),
            ", ".join(f"{m} {v:.6g}" for m, v in zip(cfg.metrics, values, strict=True)),
            verdict,
        )
        return values

    def _reporter(self, trial: optuna.Trial):
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


def _suggest(trial: optuna.Trial, path: str, entry: SpaceEntry, cfg: TuneConfig) -> Any:
    kind = cfg.kind_of(path, entry, cfg._target) if cfg._target is not None else "float"
    if kind == "categorical":
        return trial.suggest_categorical(path, entry.choices)
    if kind == "int":
        step = int(entry.step or 1)
        return trial.suggest_int(path, int(entry.low), int(entry.high), step=step, log=entry.log)
    return trial.suggest_float(path, float(entry.low), float(entry.high), step=entry.step, log=entry.log)


def _scored_variant(result: StageResult, cfg: TuneConfig) -> Variant:
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


def _metrics(variant: Variant, cfg: TuneConfig, ctx: Context) -> dict[str, Any]:
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


def _number(metrics: dict[str, Any], name: str, cfg: TuneConfig, variant: Variant) -> float:
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


# ---------------------------------------------------------------- choosing and summarising


def _confirm(
    study: optuna.Study,
    summary: dict[str, Any],
    cfg: TuneConfig,
    ctx: Context,
    out_dir: Path,
    reference: float | None,
) -> None:
    """Re-run up to ``confirm`` candidates with the target's full budget (no trial_overrides,
    validation data only), best first, and choose the first that meets the constraint without
    slack.

    A full-budget run is the expensive part, so none is spent on a candidate no more promising
    than one that already missed: after a miss, only candidates whose short-trial drop is
    smaller than every missed candidate's are confirmed. Without this rule the runs go to the
    neighbours of the first miss (the best candidates cluster at the edge of the constraint)
    and the study ends with nothing chosen while safer candidates stay untried.
    """
    assert cfg.constraint is not None and reference is not None
    candidates, _ = ranked(study.get_trials(deepcopy=False), cfg)
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    chosen = None
    bar = math.inf  # a candidate's short-trial drop must be below this to be confirmed
    for trial in candidates:
        if len(runs) == cfg.confirm:
            break
        trial_drop = float(trial.user_attrs.get("drop", 0.0))
        if trial_drop >= bar:
            skipped.append({"number": trial.number, "trial_drop": trial_drop})
            ctx.log.info(
                "%s: not confirming trial %d: its short-trial drop %.3g is not below %.3g, the "
                "smallest short-trial drop of a candidate that missed at full budget",
                cfg.label,
                trial.number,
                trial_drop,
                bar,
            )
            continue
        tic = time.perf_counter()
        result = ctx.run_stage(cfg.target, dict(trial.params), out_dir / "confirm" / f"{trial.number:05d}")
        variant = _scored_variant(result, cfg)
        metrics = _metrics(variant, cfg, ctx)
        value = _number(metrics, cfg.constraint.metric, cfg, variant)
        drop = drop_pp(reference, value, cfg.constraint)
        meets = round(drop - cfg.constraint.max_drop_pp, 9) <= 0
        runs.append(
            {
                "number": trial.number,
                "params": trial.params,
                "metrics": metrics,
                "drop": drop,
                "trial_drop": trial_drop,
                "meets": meets,
                "seconds": round(time.perf_counter() - tic, 2),
            }
        )
        ctx.log.info(
            "%s: confirming trial %d at full budget: %s %.6g, drop %.3f pp -> %s",
            cfg.label,
            trial.number,
            cfg.constraint.metric,
            value,
            drop,
            "meets the constraint" if meets else "misses the constraint",
        )
        if meets:
            chosen = trial
            break
        bar = min(bar, trial_drop)
    if not cfg.keep_trials:
        shutil.rmtree(out_dir / "confirm", ignore_errors=True)
    summary["confirmation"] = {
        "candidates": cfg.confirm,
        "rule": f"best candidates first, at most {cfg.confirm} full-budget run(s), after a miss only "
        "candidates with a smaller short-trial drop than every miss; the first whose full-budget "
        f"{cfg.constraint.metric} is at most {cfg.constraint.max_drop_pp} pp below the reference",
        "runs": runs,
        "skipped": skipped,
    }
    if chosen is None:
        summary["chosen"] = None
        return
    summary["chosen"] = {
        **_chosen_json(chosen),
        "confirmed_metrics": runs[-1]["metrics"],
        "confirmed_drop": runs[-1]["drop"],
    }


def _chosen_json(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "params": trial.params,
        "values": trial.values,
        "metrics": trial.user_attrs.get("metrics", {}),
    }


def _feasible(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and bool(trial.user_attrs.get("feasible", True))


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "maximize" else a < b


def _pareto(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        pairs = list(zip(a.values, b.values, directions, strict=True))
        return all(not _better(y, x, d) for x, y, d in pairs) and any(_better(x, y, d) for x, y, d in pairs)

    return [t for t in trials if not any(dominates(o, t) for o in trials if o is not t)]


def choose(trials: list[FrozenTrial], cfg: TuneConfig) -> tuple[FrozenTrial | None, list[FrozenTrial]]:
    """The chosen trial and the feasible Pareto front (infeasible trials are never chosen)."""
    candidates, front = ranked(trials, cfg)
    return (candidates[0] if candidates else None), front


def ranked(trials: list[FrozenTrial], cfg: TuneConfig) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """Feasible trials in the order the selection rule prefers them (the Pareto front first),
    and the front itself."""
    feasible = [t for t in trials if _feasible(t)]
    front = _pareto(feasible, cfg.directions)
    order = [cfg.primary] + [i for i in range(len(cfg.directions)) if i != cfg.primary]

    def rank(t: FrozenTrial) -> tuple:
        signs = [1 if cfg.directions[i] == "minimize" else -1 for i in order]
        return (t not in front, *[s * t.values[i] for s, i in zip(signs, order, strict=True)], t.number)

    return sorted(feasible, key=rank), sorted(front, key=lambda t: t.number)


def _best_text(study: optuna.Study, cfg: TuneConfig) -> str:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best, front = choose(trials, cfg)
    if best is None:
        return "best: none feasible yet"
    if len(cfg.metrics) == 1:
        return f"best {cfg.metrics[0]} {best.values[0]:.5g} (trial {best.number})"
    return f"pareto {len(front)}, chosen trial {best.number}"


def _summarize(
    study: optuna.Study,
    cfg: TuneConfig,
    reference: float | None,
    study_name: str,
    shown_url: str,
    started: float,
) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    chosen, front = choose(trials, cfg)
    counts = {state.name: n for state, n in _counts(study).items() if n}
    importances: dict[str, dict[str, float]] = {}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) >= 2 and len(cfg.space) >= 1:
        for i, metric in enumerate(cfg.metrics):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    raw = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
                importances[metric] = {k: float(v) for k, v in raw.items()}
            except Exception as exc:  # too few distinct trials, a constant parameter...
                importances[metric] = {"error": f"{type(exc).__name__}: {exc}"}  # type: ignore[dict-item]
    return {
        "study_name": study_name,
        "storage": shown_url,
        "target": cfg.target,
        "objectives": [
            {"metric": m, "direction": d} for m, d in zip(cfg.metrics, cfg.directions, strict=True)
        ],
        "constraint": None
        if cfg.constraint is None
        else {**cfg.constraint.model_dump(mode="json"), "against": cfg.against(), "reference": reference},
        "space": {k: v.model_dump(mode="json", exclude_none=True) for k, v in cfg.space.items()},
        "trial_overrides": cfg.trial_overrides,
        "sampler": type(study.sampler).__name__,
        "pruner": type(study.pruner).__name__,
        "n_trials": cfg.n_trials,
        "timeout": cfg.timeout,
        "selection": cfg.selection,
        "selection_rule": cfg.selection_rule(),
        "counts": counts,
        "feasible": sum(_feasible(t) for t in trials),
        "chosen": None if chosen is None else _chosen_json(chosen),
        "pareto_front": [t.number for t in front],
        "importances": importances,
        "elapsed_seconds": round(time.perf_counter() - started, 2),
        "trials": [_trial_json(t) for t in trials],
    }


def _trial_json(t: FrozenTrial) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "values": t.values if t.state == TrialState.COMPLETE else None,  # pruned: last report only
        "last_report": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
        "params": t.params,
        "feasible": _feasible(t) if t.state == TrialState.COMPLETE else None,
        "constraint": t.user_attrs.get("constraint"),
        "drop": t.user_attrs.get("drop"),
        "metrics": t.user_attrs.get("metrics", {}),
        "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
        "retry_of": t.system_attrs.get("failed_trial"),
        "rejected": t.user_attrs.get("rejected"),
        "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
        "completed": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None,
        "seconds": t.duration.total_seconds() if t.duration else None,
    }


def _trials_frame(summary: dict[str, Any]) -> pd.DataFrame:
    rows = []
    metrics = [o["metric"] for o in summary["objectives"]]
    for t in summary["trials"]:
        row = {
            "number": t["number"],
            "state": t["state"],
            **{f"value.{m}": (t["values"][i] if t["values"] else None) for i, m in enumerate(metrics)},
            "feasible": t["feasible"],
            "constraint": t["constraint"][0] if t["constraint"] else None,
            "drop": t["drop"],
            **{f"param.{k}": v for k, v in t["params"].items()},
            "seconds": t["seconds"],
            "retry_of": t["retry_of"],
            "chosen": summary["chosen"] is not None and t["number"] == summary["chosen"]["number"],
            "pareto": t["number"] in summary["pareto_front"],
            **{f"metric.{k}": v for k, v in t["metrics"].items()},
        }
        rows.append(row)
    return pd.DataFrame(rows)
