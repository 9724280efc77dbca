"""Running stages as tuning trials, for the tune and search stages.

Those stages must run other stages many times but never import the engine: the engine hands
them runners through the run context. ``ctx.run_stage`` runs a stage of the pipeline with
sampled settings (tune); ``ctx.run_step`` runs a stage kind that is not in the pipeline, one
step of a search trial's chain, on variants the trial made; and, for tune's full-budget
confirmation, ``ctx.stage_workdir`` is the work directory the target stage itself will use.
"""

from __future__ import annotations

import dataclasses
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
from compress.tuning.settings import step_config
from compress.variants import StageResult, Variant

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
        trial_ctx = _trial_context(ctx, on_epoch, None)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return registry[cfg.stage].run(cfg, trial_ctx.inputs(names), trial_ctx, out_dir)

    return run_stage


def _trial_context(ctx: Context, on_epoch: Any, train_images: int | None) -> Context:
    """A copy of ``ctx`` for one trial: its own variant maps, no runners, warnings-only logging,
    ``tuning=True``, and a dataset whose test split raises (on the first ``train_images``
    training images of the seeded split when given: a short trial's subset)."""
    bundle = ctx.data()
    if train_images is not None and train_images < len(bundle.train):
        bundle = dataclasses.replace(bundle, train=bundle.train.head(train_images))
    return replace(
        ctx,
        variants=dict(ctx.variants),
        artifacts={k: dict(v) for k, v in ctx.artifacts.items()},
        results=dict(ctx.results),
        published=dict(ctx.published),
        run_stage=None,
        run_step=None,
        stage_workdir=None,
        log=_TRIAL_LOG,  # warnings only: the tuning stage logs one line per trial
        tuning=True,
        on_epoch=on_epoch,
        _data=TuningBundle.wrap(bundle),
    )


def step_runner(ctx: Context, registry: dict[str, StageDef]):
    """``ctx.run_step`` for search stages: run a stage of kind ``kind`` that is not in the
    pipeline, with ``settings`` (validated by that kind's own config class, so a refused value is
    a ConfigError naming it), on ``inputs`` (variants an earlier step of the trial made), as a
    tuning trial: validation data only, on the first ``train_images`` training images when given.
    """

    def run_step(
        kind: str,
        settings: dict[str, Any],
        inputs: list[Variant],
        out_dir: Path,
        on_epoch: Any = None,
        train_images: int | None = None,
    ) -> StageResult:
        if kind not in registry:
            raise ConfigError(f"no stage kind {kind!r}; kinds: {', '.join(sorted(registry))}")
        try:
            cfg = step_config(registry[kind].config, settings, [v.name for v in inputs], ctx.pipeline.config)
        except ValueError as exc:
            raise ConfigError(f"{kind} step: {exc}") from None
        trial_ctx = _trial_context(ctx, on_epoch, train_images)
        trial_ctx.variants.update({v.name: v for v in inputs})
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return registry[kind].run(cfg, inputs, trial_ctx, out_dir)

    return run_step


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
