"""Running a stage of the pipeline as a tuning trial, for the tune stage.

The tune stage must run another stage many times but never imports the engine: the engine
hands it this runner through the run context (``ctx.run_stage``), and, for its full-budget
confirmation, the work directory the target stage itself will use (``ctx.stage_workdir``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from compress.config import StageConfig
from compress.context import Context
from compress.engine import cache
from compress.errors import ArtifactError, ConfigError
from compress.stages import StageDef
from compress.tuning import TuningBundle, with_settings
from compress.variants import StageResult

_TRIAL_LOG = logging.getLogger("compress.trial")
_TRIAL_LOG.setLevel(logging.WARNING)


def _configured(ctx: Context, label: str, settings: dict[str, Any]) -> tuple[StageConfig, list[str]]:
    """Stage ``label``'s config with ``settings`` applied (validated by its own schema), and the
    variants it reads, all of which must exist by now."""
    stages = {s.label: s for s in ctx.pipeline.stages}
    if label not in stages:
        raise ConfigError(f"{ctx.pipeline.path}: no stage named {label!r} to tune")
    try:
        cfg = with_settings(stages[label], settings, ctx.pipeline.config)
    except ValueError as exc:
        raise ConfigError(f"{ctx.pipeline.path}: stage {label!r}: {exc}") from None
    names = cfg.consumes(list(ctx.variants))
    missing = [n for n in names if n not in ctx.variants]
    if missing:
        raise ArtifactError(
            f"stage {label!r} needs variant(s) {', '.join(missing)}, which are not made before "
            "the tune stage; move the tune stage after the stages that make them"
        )
    return cfg, names


def trial_runner(ctx: Context, registry: dict[str, StageDef]):
    """``ctx.run_stage`` for tune stages: run a stage of this pipeline as a tuning trial.

    The stage gets its config with ``settings`` (YAML paths inside it) applied and validated
    by its own schema, a copy of the context with ``tuning=True``, the per-epoch hook, and a
    dataset whose test split raises when read. It writes only into ``out_dir``.
    """

    def run_stage(label: str, settings: dict[str, Any], out_dir: Path, on_epoch: Any = None) -> StageResult:
        cfg, names = _configured(ctx, label, settings)
        trial_ctx = replace(
            ctx,
            variants=dict(ctx.variants),
            artifacts={k: dict(v) for k, v in ctx.artifacts.items()},
            results=dict(ctx.results),
            published=dict(ctx.published),
            run_stage=None,
            stage_workdir=None,
            log=_TRIAL_LOG,  # warnings only: the tune stage logs one line per trial
            tuning=True,
            on_epoch=on_epoch,
            _data=TuningBundle.wrap(ctx.data()),
        )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return registry[cfg.stage].run(cfg, trial_ctx.inputs(names), trial_ctx, out_dir)

    return run_stage


def stage_workdir(ctx: Context, registry: dict[str, StageDef], base: Path):
    """``ctx.stage_workdir`` for tune stages: where stage ``label`` will run with ``settings``.

    A full-budget confirmation trains exactly what the target stage will train once the tune
    stage hands it the chosen settings. Run in the target's own work directory, its training
    checkpoints are there when the engine reaches the target, which resumes from them (as after
    an interruption) and only evaluates and saves, instead of training a second time. Yields
    None when that stage's result is already cached or another run holds its directory; the
    directory is held (its cache lock) until the block ends.
    """

    @contextmanager
    def workdir(label: str, settings: dict[str, Any]) -> Iterator[Path | None]:
        cfg, names = _configured(ctx, label, settings)
        key = cache.stage_key(registry[cfg.stage], cfg, ctx.inputs(names), ctx)
        entry, partial = cache.entry_paths(base, label, key)
        if (entry / "result.json").is_file():
            yield None
            return
        lock = FileLock(str(cache.lock_file(base / "cache", entry.name)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            yield None
            return
        try:
            yield partial
        finally:
            lock.release()

    return workdir
