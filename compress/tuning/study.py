"""The Optuna study's life: opened or resumed on its storage (``load_if_exists``, heartbeats,
the trials of a killed run retried), given its sampler and pruner, and run until it holds
exactly ``n_trials`` finished trials however many workers share it.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from tqdm import tqdm

from compress.config import mask_secrets
from compress.context import Context
from compress.errors import CompressError, ConfigError
from compress.tuning.objective import Objective, TrialEvaluator, TrialRejected
from compress.tuning.refine import enqueue_refinements
from compress.tuning.settings import value_at
from compress.tuning.spec import SearchSpec
from compress.tuning.storage import StudyLock
from compress.tuning.summary import best_text, state_counts

POLL_SECONDS = 1.0


@contextmanager
def _experimental_ok() -> Iterator[None]:
    """Heartbeats, metric names and constrained samplers are experimental in Optuna; we use
    them on purpose, so their warnings would only be noise in the log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@contextmanager
def opened_study(
    url: str, shown_url: str, study_name: str, cfg: SearchSpec, ctx: Context, private: bool
) -> Iterator[tuple[optuna.Study, StudyLock]]:
    """The study named ``study_name`` in ``url`` (created, or loaded to resume), with its
    sampler and pruner set, and the lock every process sharing it takes to start a trial.

    ``private``: the stage's own database, which only this process uses, so trials left
    running there are a killed run's and are retried at once. Optuna logs only warnings while
    the study is open; the lock is closed when it is left.
    """
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
                    with _experimental_ok():
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
        yield study, lock
    finally:
        if lock is not None:
            lock.close()
        optuna.logging.set_verbosity(verbosity)


def _open_storage(url: str, cfg: SearchSpec) -> RDBStorage:
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    with _experimental_ok():
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=cfg.heartbeat_interval,
            grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
        )


def _enqueue_default(study: optuna.Study, cfg: SearchSpec, ctx: Context) -> None:
    """Trial 0 evaluates the target's hand-set values, so the choice is never worse than them
    (on the trial budget) whenever they meet the constraint."""
    target = cfg.target_config
    if target is None:
        return
    params = {path: value_at(target, path) for path in cfg.space}
    for path, entry in cfg.space.items():
        if not entry.contains(params[path]):
            ctx.log.info("%s: %s's own %s=%r is outside the space", cfg.label, cfg.target, path, params[path])
            return
    study.enqueue_trial(params, user_attrs={"default": True})


def _recover_orphans(study: optuna.Study, storage: RDBStorage, cfg: SearchSpec, ctx: Context) -> None:
    """Trials left RUNNING in this stage's own database belong to a killed run of this stage
    (the engine lets only one process run it): fail them and queue a retry, without waiting
    for their heartbeats to go stale."""
    with _experimental_ok():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
            retry(study, storage.get_trial(trial._trial_id))
            ctx.log.info("%s: trial %d was cut short by a killed run; retrying it", cfg.label, trial.number)


def _sampler(cfg: SearchSpec, seed: int) -> optuna.samplers.BaseSampler:
    """Constrained samplers read each trial's ``trial.set_constraint`` values (Optuna 5)."""
    kind = cfg.sampler if cfg.sampler != "auto" else ("nsga2" if len(cfg.directions) > 1 else "tpe")
    with _experimental_ok():
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "nsga2":
            population = cfg.population_size or max(4, min(50, cfg.n_trials // 3))
            return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
        startup = cfg.startup_trials or max(3, min(10, cfg.n_trials // 3))
        return optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed, multivariate=True)


def _pruner(cfg: SearchSpec) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, (cfg.startup_trials or 3) // 2))
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def optimize(
    study: optuna.Study,
    lock: StudyLock,
    cfg: SearchSpec,
    ctx: Context,
    out_dir: Path,
    reference: float | None,
    started: float,
    evaluate: TrialEvaluator | None = None,
    refine: bool = False,
) -> None:
    """Run trials until the study holds exactly n_trials finished (complete or pruned) ones.
    ``evaluate`` runs and scores one trial; None: the tune stage's (its target stage).
    ``refine``: once the design trials are scored, queue ``refine.enqueue_refinements``.

    Under the lock: fail stale trials (killed workers), count, and start a trial only when
    finished + running + queued is below n_trials (or a queued retry is waiting). The trial
    releases the lock once Optuna has created it. When the rest are running elsewhere, wait
    for them, so every worker ends with the same, complete study.
    """
    deadline = started + cfg.timeout if cfg.timeout else math.inf
    rejected = 0
    counts = state_counts(study)
    bar = tqdm(
        total=cfg.n_trials,
        initial=min(cfg.n_trials, counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]),
        desc=f"{cfg.label} trials",
        dynamic_ncols=True,
        leave=False,
    )
    objective = Objective(cfg, ctx, out_dir, reference, lock, evaluate)
    try:
        while True:
            lock.acquire()
            try:
                with _experimental_ok():
                    optuna.storages.fail_stale_trials(study)
                counts = state_counts(study)
                done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
                waiting, running = counts[TrialState.WAITING], counts[TrialState.RUNNING]
                if refine and waiting == 0 and running == 0:  # the design is scored: now or never
                    refine = False
                    if enqueue_refinements(study, len(cfg.metrics), cfg.n_trials - done):
                        counts = state_counts(study)
                bar.n = min(done, cfg.n_trials)
                bar.set_postfix_str(best_text(study, cfg), refresh=True)
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
