"""The engine: orders the stages, runs each one or reuses its cached result, and records it.

The cache (``engine.cache``) decides whether a stage's result can be reused; the run directory
(``engine.rundir``) records what happened. Under torchrun, rank 0 decides and commits while
training stages run on every rank (``_run_on_ranks``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from filelock import FileLock

from compress import distributed
from compress.config import Pipeline, StageConfig, did_you_mean
from compress.context import Context
from compress.data import DataSource, prepare, resolve_root
from compress.engine import cache, rundir
from compress.engine.ahead import Ahead
from compress.engine.ahead import enabled as ahead_enabled
from compress.engine.execute import execute
from compress.engine.records import RunOptions, RunSummary, StageRecord
from compress.engine.trials import stage_workdir, step_runner, trial_runner
from compress.errors import ArtifactError, ConfigError, DataError
from compress.fileio import write_json, write_text
from compress.stages import StageDef, load_stages
from compress.training import resolve_precision, training_configs
from compress.tuning import with_settings
from compress.variants import StageResult, Variant

log = logging.getLogger("compress")


def resolve_device(requested: str, where: str = "device") -> torch.device:
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{where}: 'cuda' was requested but no CUDA device is available; "
                "use --device auto or --device cpu (or device: cpu in the pipeline)"
            )
        return torch.device("cuda")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cpu")


def run_pipeline(pipeline: Pipeline, options: RunOptions) -> RunSummary:
    """Run the pipeline's stages in order, each run or reused from the cache, and record the run
    (``run.log``, ``config.yaml``, ``manifest.json``, the ``latest`` link).

    Everything that can be refused (flags, device, precision, data) is checked before the run
    directory exists; the run log's handler is removed however the run ends.
    """
    registry = load_stages()
    _check_options(pipeline, options)
    device = _device(pipeline, options)
    _check_precision(pipeline, device)
    data = _find_data(pipeline, options, registry)
    base = Path(options.artifacts_dir) / pipeline.name
    run_id = _make_run_dir(base)
    run_dir = base / run_id
    # under torchrun only rank 0 writes the run directory, the manifest and reports/
    main = distributed.is_main()
    handler = rundir.attach_log_file(run_dir / "run.log") if main else logging.NullHandler()
    try:
        if main:
            write_text(
                run_dir / "config.yaml", yaml.safe_dump(rundir.resolved_config(pipeline), sort_keys=False)
            )
        for record in data.notes:
            handler.handle(record)
        ctx = Context(pipeline, run_id, run_dir, device, data.root, data.source, prepared=data.prepared)
        summary = RunSummary(pipeline.name, run_id, run_dir, Path(options.reports_dir) / pipeline.name)
        manifest = rundir.manifest_header(pipeline, run_id, device, data.root, data.source)
        ctx.manifest, ctx.reports_dir = manifest, summary.reports_dir
        ctx.worker, ctx.run_stage = options.worker, trial_runner(ctx, registry)
        ctx.stage_workdir = stage_workdir(ctx, registry, base)
        ctx.run_step = step_runner(ctx, registry)
        return _Run(pipeline, options, registry, base, ctx, summary, manifest, main).run_stages()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _check_options(pipeline: Pipeline, options: RunOptions) -> None:
    """``--from`` and ``--only`` name stages of this pipeline; ``--worker`` names a stage that can
    share its work (a tune stage) through ``--only``."""
    labels = [s.label for s in pipeline.stages]
    for flag, value in (("--from", options.from_stage), ("--only", options.only_stage)):
        if value is not None and value not in labels:
            raise ConfigError(
                f"{flag} {value}: no stage of that name in {pipeline.path}"
                f"{did_you_mean(value, labels)}; stages: {', '.join(labels)}"
            )
    if options.worker:
        only = next((s for s in pipeline.stages if s.label == options.only_stage), None)
        if only is None or not getattr(only, "supports_workers", False):
            raise ConfigError(
                "--worker needs --only STAGE naming a stage that can share its work with other "
                "processes (a tune or search stage), e.g. --only tune --worker"
            )


def _device(pipeline: Pipeline, options: RunOptions) -> torch.device:
    """``--device`` or the pipeline's ``device``; under torchrun, this rank's GPU (cuda:LOCAL_RANK)."""
    device = resolve_device(
        options.device or pipeline.config.device, "--device" if options.device else f"{pipeline.path}: device"
    )
    return distributed.local_device(device)


class _FoundData(NamedTuple):
    root: Path
    source: str  # where the root came from: --data-root, COMPRESS_DATA_ROOT, data.root, ...
    prepared: DataSource | None
    notes: list[logging.LogRecord]  # what finding it logged, for run.log once that exists


def _find_data(pipeline: Pipeline, options: RunOptions, registry: dict[str, StageDef]) -> _FoundData:
    """The data root and the pipeline's data, found and checked before anything is written: missing
    or bad data fails now, even if every stage is cached."""
    try:
        data_root, data_source = resolve_root(
            options.data_root, pipeline.config.data.root, pipeline.path.parent, options.data_root_from
        )
        with _kept_log_records() as notes:  # for run.log, which does not exist yet
            prepared = _prepare_data(pipeline, registry, data_root, data_source)
    except DataError as exc:
        raise DataError(f"{pipeline.path}: {exc}") from None
    return _FoundData(data_root, data_source, prepared, notes)


def _make_run_dir(base: Path) -> str:
    """A new run directory under ``base`` (rank 0 makes it under torchrun); its run id."""
    try:
        return distributed.on_main(lambda: rundir.make_run_dir(base))
    except OSError as exc:
        raise ArtifactError(
            f"cannot create {exc.filename or base}: {exc.strerror}; make {base} writable (or use "
            "--artifacts elsewhere) or free some disk space"
        ) from None


@dataclass
class _Run:
    """One run while its stages run: the context the stages see, the summary the CLI gets, the
    manifest (rank 0 rewrites it after every stage) and the settings tune stages chose."""

    pipeline: Pipeline
    options: RunOptions
    registry: dict[str, StageDef]
    base: Path
    ctx: Context
    summary: RunSummary
    manifest: dict[str, Any]
    main: bool  # rank 0 (or no torchrun): writes the run directory and reports/
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage label -> tuned settings

    def run_stages(self) -> RunSummary:
        """Each stage in order (``--from`` reruns from a stage on, ``--only`` stops after one),
        then the run's totals in the summary and the manifest, and the ``latest`` link. Stages
        that need only variants made so far may run ahead in a second process (``ahead``)."""
        options, summary = self.options, self.summary
        labels = [s.label for s in self.pipeline.stages]
        started = time.perf_counter()
        rerun = options.force
        on = ahead_enabled(options, self.ctx.device) and self.main
        ahead = Ahead(self.pipeline.stages, self.registry, self.base, self.ctx.run_dir, on)
        early: dict[int, tuple[StageRecord, StageConfig]] = {}  # run out of order, taken in order
        try:
            for position, cfg in enumerate(self.pipeline.stages):
                if options.only_stage is not None and position > labels.index(options.only_stage):
                    break
                ahead.launch(position, list(self.ctx.variants), self._run_ahead, self._cached)
                if position not in early and ahead.on:
                    self._meanwhile(position, ahead, early)
                record, cfg = early.pop(position, None) or self._run_one(cfg, rerun)
                rerun = rerun or options.from_stage == cfg.label
                self._take(self.registry[cfg.stage], cfg, self._claim(record, ahead))
        finally:
            ahead.finish()
        summary.variants = dict(self.ctx.variants)
        summary.seconds = time.perf_counter() - started
        self.manifest["seconds"] = round(summary.seconds, 2)
        if self.main:
            write_json(self.ctx.run_dir / "manifest.json", self.manifest)
            rundir.link(self.base / "latest", self.ctx.run_dir)
        return summary

    def _run_ahead(self, cfg: StageConfig, wait: bool) -> str:
        """In the process working ahead: one stage run or reused, its variants kept for the next;
        with ``wait=False``, ``cache.Busy`` when the parent is at it."""
        cfg = _apply_tuned(cfg, self.tuned.get(cfg.label), self.pipeline)
        record = _run_or_reuse(self.registry[cfg.stage], cfg, self.ctx, self.base, force=False, wait=wait)
        self.ctx.variants.update({v.name: v for v in record.result.variants})
        return record.status

    def _meanwhile(self, position: int, ahead: Ahead, early: dict) -> None:
        """While the process working ahead holds stage ``position``, run the later stages that
        are ready and free here, so neither process waits on the other."""
        stages = self.pipeline.stages
        while ahead.holds(stages[position], self._key(stages[position])):
            ready = ahead.ready_after(position, list(self.ctx.variants), set(early))
            ran = False
            for k in ready:
                try:
                    early[k] = self._run_one(stages[k], False, wait=False)
                    ran = True
                    break
                except cache.Busy:
                    continue
            if not ran:
                return  # nothing else to do: wait for it

    def _cached(self, cfg: StageConfig) -> bool:
        entry, _ = cache.entry_paths(self.base, cfg.label, self._key(cfg))
        return (entry / "result.json").is_file()

    def _key(self, cfg: StageConfig) -> str:
        cfg = _apply_tuned(cfg, self.tuned.get(cfg.label), self.pipeline, say=False)
        inputs = self.ctx.inputs(cfg.consumes(list(self.ctx.variants)))
        return cache.stage_key(self.registry[cfg.stage], cfg, inputs, self.ctx)

    def _run_one(self, cfg: StageConfig, rerun: bool, wait: bool = True) -> tuple[StageRecord, StageConfig]:
        """One stage: run or reused (``--only``: only that one runs), with its tuned settings."""
        options = self.options
        definition = self.registry[cfg.stage]
        cfg = _apply_tuned(cfg, self.tuned.get(cfg.label), self.pipeline)
        rerun = rerun or options.from_stage == cfg.label
        if options.only_stage is None:
            return _run_or_reuse(definition, cfg, self.ctx, self.base, force=rerun, wait=wait), cfg
        must_run = cfg.label == options.only_stage
        record = _run_or_reuse(
            definition,
            cfg,
            self.ctx,
            self.base,
            force=must_run,
            cache_only=not must_run,
            worker=options.worker and must_run,
        )
        return record, cfg

    @staticmethod
    def _claim(record: StageRecord, ahead: Ahead) -> StageRecord:
        """A stage the process working ahead ran counts as run here, with its time."""
        seconds = ahead.ran_ahead(record.label) if record.status == "cached" else None
        if seconds is not None:
            record.status, record.seconds, record.ahead = "ran", seconds, True
        return record

    def _take(self, definition: StageDef, cfg: StageConfig, record: StageRecord) -> None:
        """A finished stage's record: logged, its results and variants handed to later stages, and
        (rank 0) linked, published and written to the manifest."""
        ctx = self.ctx
        self.summary.records.append(record)
        log.info(
            "stage %s: %s in %.1fs%s%s",
            record.label,
            record.status,
            record.seconds,
            " (ahead, in a second process)" if record.ahead else "",
            f" -> {', '.join(record.outputs)}" if record.outputs else "",
        )
        ctx.results[cfg.label] = record.result
        ctx.published[cfg.label] = {
            target: record.directory / source for source, target in record.result.publish.items()
        }
        for label, settings in record.result.overrides.items():
            self.tuned.setdefault(label, {}).update(settings)
        for variant in record.result.variants:
            ctx.variants[variant.name] = variant
        for name, files in record.result.artifacts.items():
            ctx.artifacts.setdefault(name, {}).update(files)
        if not self.main:
            return
        rundir.link(ctx.run_dir / "stages" / cfg.label, record.directory)
        rundir.publish(record, self.summary.reports_dir)
        self.manifest["stages"].append(rundir.manifest_entry(record, ctx))
        if cfg.label in self.tuned:
            self.manifest["stages"][-1]["tuned_settings"] = self.tuned[cfg.label]
        if definition.distributed and training_configs(cfg):
            self.manifest["stages"][-1]["training"] = _training_entry(cfg, record, ctx.device)
        self.manifest["variants"] = {
            v.name: {
                "stage": v.stage,
                "parent": v.parent,
                "format": v.format,
                "file": str(v.file),
                "metrics": rundir.brief(v.metrics),
            }
            for v in ctx.variants.values()
        }
        write_json(ctx.run_dir / "manifest.json", self.manifest)


def _run_or_reuse(
    definition: StageDef,
    cfg: StageConfig,
    ctx: Context,
    base: Path,
    force: bool,
    cache_only: bool = False,
    worker: bool = False,
    wait: bool = True,
) -> StageRecord:
    input_names = cfg.consumes(list(ctx.variants))
    missing = [name for name in input_names if name not in ctx.variants]
    if missing:
        raise ArtifactError(
            f"stage {cfg.label!r} needs variant(s) {', '.join(missing)}, which no earlier stage "
            "produced in this run"
        )
    inputs = ctx.inputs(input_names)
    key = cache.stage_key(definition, cfg, inputs, ctx)
    entry, partial = cache.entry_paths(base, cfg.label, key)
    tic = time.perf_counter()
    if worker:
        # Workers share the stage's work (a study in a shared database), so they run side by
        # side, each in a directory of its own, and only take the lock to commit.
        partial = partial.with_name(f"{entry.name}.worker-{os.getpid()}")
        log.info("stage %s: running as a worker (%s)", cfg.label, entry.name)
        result = execute(definition, cfg, inputs, ctx, partial)
        with FileLock(str(cache.lock_file(base / "cache", entry.name))):
            cache.commit(partial, entry, result)
            result = cache.load_cached(entry, cfg.label, verify=False)
        return StageRecord(
            cfg.label, cfg.stage, "ran", time.perf_counter() - tic, key, entry, input_names,
            [v.name for v in result.variants], result,
        )  # fmt: skip
    if distributed.initialized():  # launched by torchrun with several processes
        status, result = _run_on_ranks(definition, cfg, inputs, ctx, base, entry, partial, force, cache_only)
        return StageRecord(
            cfg.label, cfg.stage, status, time.perf_counter() - tic, key, entry, input_names,
            [v.name for v in result.variants], result,
        )  # fmt: skip
    with cache.entry_lock(cache.lock_file(base / "cache", entry.name), cfg.label, wait):
        cached = None if force else cache.load_cached(entry, cfg.label)
        if cached is not None:
            log.info("stage %s: cached (%s)", cfg.label, entry.name)
            status, result = "cached", cached
        elif cache_only:
            raise cache.not_cached_error(cfg.label)
        else:
            log.info("stage %s: running (%s)", cfg.label, entry.name)
            if definition.needs_results:
                cache.sweep_abandoned(base / "cache", cfg.label, entry.name)
            result = execute(definition, cfg, inputs, ctx, partial)
            cache.commit(partial, entry, result)
            result = cache.load_cached(entry, cfg.label, verify=False)
            status = "ran"
    return StageRecord(
        label=cfg.label,
        kind=cfg.stage,
        status=status,
        seconds=time.perf_counter() - tic,
        key=key,
        directory=entry,
        inputs=input_names,
        outputs=[v.name for v in result.variants],
        result=result,
    )


def _run_on_ranks(
    definition: StageDef,
    cfg: StageConfig,
    inputs: list[Variant],
    ctx: Context,
    base: Path,
    entry: Path,
    partial: Path,
    force: bool,
    cache_only: bool,
) -> tuple[str, StageResult]:
    """One stage under torchrun: rank 0 decides and commits, every rank ends with its result.

    Rank 0 holds the entry's lock and decides (cached / run); the others follow. A stage
    registered ``distributed=True`` runs on every rank (DDP inside ``training.fit``): rank 0
    in the cache's work directory, the others in scratch copies of it that are then deleted.
    Any other stage runs on rank 0 alone (``distributed.solo``) while the others wait. Either
    way rank 0 commits the one cache entry, and every rank reads its result from there.
    """
    main = distributed.is_main()
    with ExitStack() as held:

        def decide() -> str:
            held.enter_context(cache.entry_lock(cache.lock_file(base / "cache", entry.name), cfg.label))
            if not force and cache.load_cached(entry, cfg.label) is not None:
                return "cached"
            if cache_only:
                raise cache.not_cached_error(cfg.label)
            return "run"

        status = distributed.on_main(decide)
        log.info("stage %s: %s (%s)", cfg.label, "cached" if status == "cached" else "running", entry.name)
        if status == "run" and definition.distributed:
            workdir = partial if main else distributed.scratch_copy(partial)
            distributed.barrier()  # rank 0 touches its work directory only once the copies exist
            try:
                if definition.needs_data:
                    with distributed.main_first():  # rank 0 unpacks (or downloads) the data first
                        ctx.data()
                error: BaseException | None = None
                try:
                    result = execute(definition, cfg, inputs, ctx, workdir)
                except BaseException as exc:  # tell the other ranks before raising
                    error = exc
                distributed.check_peers(error)
                if error is not None:
                    raise error
            finally:
                if not main:
                    distributed.discard(workdir)
            distributed.on_main(lambda: cache.commit(partial, entry, result))
        elif status == "run":

            def alone() -> None:
                with distributed.solo():
                    result = execute(definition, cfg, inputs, ctx, partial)
                cache.commit(partial, entry, result)

            distributed.on_main(alone)
        return ("cached" if status == "cached" else "ran"), cache.load_cached(entry, cfg.label, verify=False)


def _prepare_data(
    pipeline: Pipeline, registry: dict[str, StageDef], root: Path, label: str
) -> DataSource | None:
    """The pipeline's data found and checked (rank 0 first under torchrun: it may decompress)."""
    if not any(registry[s.stage].needs_data for s in pipeline.stages):
        return None
    with distributed.main_first():
        source = prepare(pipeline.config.data, root, label)
    log.info("data: %s", source.describe())
    return source


@contextmanager
def _kept_log_records() -> Iterator[list[logging.LogRecord]]:
    """The log records of the block, to be written to the run log once it exists."""
    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    keeper = Keep(logging.INFO)
    log.addHandler(keeper)
    try:
        yield kept
    finally:
        log.removeHandler(keeper)


def _check_precision(pipeline: Pipeline, device: torch.device) -> None:
    """Every training stage's ``precision`` is possible on ``device`` and, under torchrun, its
    ``batch_size`` (the global batch) splits evenly across the processes: before anything runs."""
    for index, cfg in enumerate(pipeline.stages):
        for prefix, training in training_configs(cfg).items():
            try:
                resolve_precision(training, device)
                if distributed.initialized():
                    distributed.per_rank_batch(training.batch_size or 128, "batch_size")
            except ConfigError as exc:
                raise ConfigError(f"{pipeline.path}: stages[{index}] ({cfg.label}).{prefix}{exc}") from None


def _training_entry(cfg: StageConfig, record: StageRecord, device: torch.device) -> dict[str, Any]:
    """How a training stage trains on this device (a cached one was trained by an earlier run
    on the same device type; the world size is known only for a stage that ran now)."""
    entry: dict[str, Any] = {
        "precision": "/".join(sorted({resolve_precision(t, device) for t in training_configs(cfg).values()})),
    }
    if record.status == "ran":
        entry["world_size"] = distributed.world_size()
    return entry


def _apply_tuned(
    cfg: StageConfig, settings: dict[str, Any] | None, pipeline: Pipeline, say: bool = True
) -> StageConfig:
    """The stage's config with the settings a tune stage chose (so they are in its cache key)."""
    if not settings:
        return cfg
    try:
        tuned = with_settings(cfg, settings, pipeline.config)
    except ValueError as exc:
        raise ConfigError(f"{pipeline.path}: stage {cfg.label!r}: invalid tuned settings: {exc}") from None
    if say:
        log.info(
            "stage %s: tuned settings %s", cfg.label, ", ".join(f"{k}={v!r}" for k, v in settings.items())
        )
    return tuned
