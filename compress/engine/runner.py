"""The engine: orders the stages, has each one run or reused, and records it.

One stage at a time is ``engine.stage_run`` (the cache, ``--worker``, torchrun ranks); the
cache (``engine.cache``) decides whether a stage's result can be reused; the run directory
(``engine.rundir``) records what happened; ``engine.ahead`` runs ready stages in a second process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from compress import distributed
from compress.config import Pipeline, StageConfig, did_you_mean
from compress.context import Context
from compress.data import DataSource, prepare, resolve_root
from compress.engine import cache, rundir
from compress.engine.ahead import Ahead
from compress.engine.ahead import enabled as ahead_enabled
from compress.engine.records import RunOptions, RunSummary, StageRecord
from compress.engine.stage_run import run_or_reuse
from compress.engine.trials import stage_workdir, step_runner, trial_runner
from compress.errors import ArtifactError, ConfigError, DataError
from compress.fileio import write_json, write_text
from compress.stages import StageDef, load_stages
from compress.training import resolve_precision, training_configs
from compress.tuning import with_settings

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
                self._take(self.registry[cfg.stage], cfg, self._claim(record))
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
        record = run_or_reuse(self.registry[cfg.stage], cfg, self.ctx, self.base, force=False, wait=wait)
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
            return run_or_reuse(definition, cfg, self.ctx, self.base, force=rerun, wait=wait), cfg
        must_run = cfg.label == options.only_stage
        record = run_or_reuse(
            definition,
            cfg,
            self.ctx,
            self.base,
            force=must_run,
            cache_only=not must_run,
            worker=options.worker and must_run,
        )
        return record, cfg

    def _claim(self, record: StageRecord) -> StageRecord:
        """A stage the process working ahead ran (found cached here, made in this run) counts as
        run here, with its time."""
        made = record.result.made
        if record.status == "cached" and made.get("run") == str(self.ctx.run_dir):
            record.status, record.seconds, record.ahead = "ran", float(made["seconds"]), True
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
