"""The engine: orders stages, resolves inputs, caches outputs, writes the run directory.

Layout under ``artifacts/<pipeline>/``::

    cache/<stage>-<key>/      a finished stage's outputs + result.json (the cache entry)
    cache/.partial/<...>/     a stage at work; kept after a crash so training can resume
    <run-id>/                 config.yaml, manifest.json, run.log, stages/<stage> -> cache

A stage's key hashes its kind and version, its config, its inputs' file hashes, the seed,
the data spec and the device type. A stage runs in ``.partial`` and is renamed into
``cache`` only when complete, so a failed or killed stage is never a cache hit.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout

from compress import distributed, faults
from compress.config import Pipeline, StageConfig, TrainingConfig, did_you_mean
from compress.context import Context
from compress.data import resolve_root
from compress.errors import ArtifactError, CompressError, ConfigError, DataError, StorageError
from compress.fileio import hash_tree, read_json, sha256_file, sha256_json, write_json, write_text
from compress.measure import cpu_model
from compress.stages import StageDef, load_stages
from compress.training import resolve_precision, training_configs
from compress.tuning import TuningBundle, mask_secrets, with_settings
from compress.variants import StageResult, Variant

log = logging.getLogger("compress")
_TRIAL_LOG = logging.getLogger("compress.trial")
_TRIAL_LOG.setLevel(logging.WARNING)


@dataclass
class RunOptions:
    data_root: str | None = None
    device: str | None = None
    force: bool = False
    from_stage: str | None = None
    only_stage: str | None = None
    artifacts_dir: Path = Path("artifacts")
    reports_dir: Path = Path("reports")
    # --worker: run the --only stage (a tune stage) alongside other processes sharing its study
    worker: bool = False


@dataclass
class StageRecord:
    label: str
    kind: str
    status: str  # "ran" | "cached"
    seconds: float
    key: str
    directory: Path
    inputs: list[str]
    outputs: list[str]
    result: StageResult


@dataclass
class RunSummary:
    pipeline: str
    run_id: str
    run_dir: Path
    reports_dir: Path
    records: list[StageRecord] = field(default_factory=list)
    variants: dict[str, Variant] = field(default_factory=dict)
    seconds: float = 0.0


class StageFailed(Exception):
    """A stage raised; the traceback is in its error.log and in run.log."""

    def __init__(self, label: str, error: BaseException, log_path: Path):
        super().__init__(f"stage {label!r} failed: {type(error).__name__}: {error}")
        self.label, self.error, self.log_path = label, error, log_path


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
    registry = load_stages()
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
                "processes (a tune stage), e.g. --only tune --worker"
            )
    device = resolve_device(
        options.device or pipeline.config.device, "--device" if options.device else f"{pipeline.path}: device"
    )
    device = distributed.local_device(device)  # cuda:LOCAL_RANK under torchrun
    _check_precision(pipeline, device)
    try:
        data_root, data_source = resolve_root(
            options.data_root, pipeline.config.data.root, pipeline.path.parent
        )
    except DataError as exc:
        raise DataError(f"{pipeline.path}: {exc}") from None

    base = Path(options.artifacts_dir) / pipeline.name
    try:
        run_id = distributed.on_main(lambda: _make_run_dir(base))  # under torchrun rank 0 makes it
        run_dir = base / run_id
    except OSError as exc:
        raise ArtifactError(
            f"cannot create {exc.filename or base}: {exc.strerror}; make {base} writable (or use "
            "--artifacts elsewhere) or free some disk space"
        ) from None
    # under torchrun only rank 0 writes the run directory, the manifest and reports/
    main = distributed.is_main()
    handler = _attach_log_file(run_dir / "run.log") if main else logging.NullHandler()
    try:
        if main:
            write_text(run_dir / "config.yaml", yaml.safe_dump(_resolved(pipeline), sort_keys=False))
        ctx = Context(pipeline, run_id, run_dir, device, data_root, data_source)
        summary = RunSummary(pipeline.name, run_id, run_dir, Path(options.reports_dir) / pipeline.name)
        manifest = _manifest_header(pipeline, run_id, device, data_root, data_source)
        ctx.manifest, ctx.reports_dir = manifest, summary.reports_dir
        ctx.worker, ctx.run_stage = options.worker, _stage_runner(ctx, registry)
        tuned: dict[str, dict[str, Any]] = {}  # stage label -> settings chosen by a tune stage
        started = time.perf_counter()
        rerun = options.force
        for cfg in pipeline.stages:
            definition = registry[cfg.stage]
            cfg = _apply_tuned(cfg, tuned.get(cfg.label), pipeline)
            if options.from_stage == cfg.label:
                rerun = True
            if options.only_stage is not None:
                past_only = labels.index(cfg.label) > labels.index(options.only_stage)
                if past_only:
                    break
                must_run = cfg.label == options.only_stage
                record = _run_or_reuse(
                    definition,
                    cfg,
                    ctx,
                    base,
                    force=must_run,
                    cache_only=not must_run,
                    worker=options.worker and must_run,
                )
            else:
                record = _run_or_reuse(definition, cfg, ctx, base, force=rerun)
            summary.records.append(record)
            log.info(
                "stage %s: %s in %.1fs%s",
                record.label,
                record.status,
                record.seconds,
                f" -> {', '.join(record.outputs)}" if record.outputs else "",
            )
            ctx.results[cfg.label] = record.result
            for label, settings in record.result.overrides.items():
                tuned.setdefault(label, {}).update(settings)
            for variant in record.result.variants:
                ctx.variants[variant.name] = variant
            for name, files in record.result.artifacts.items():
                ctx.artifacts.setdefault(name, {}).update(files)
            if not main:
                continue
            _link(run_dir / "stages" / cfg.label, record.directory)
            _publish(record, summary.reports_dir)
            manifest["stages"].append(_manifest_entry(record, ctx))
            if cfg.label in tuned:
                manifest["stages"][-1]["tuned_settings"] = tuned[cfg.label]
            if definition.distributed and training_configs(cfg):
                manifest["stages"][-1]["training"] = _training_entry(cfg, record, device)
            manifest["variants"] = {
                v.name: {
                    "stage": v.stage,
                    "parent": v.parent,
                    "format": v.format,
                    "file": str(v.file),
                    "metrics": _brief(v.metrics),
                }
                for v in ctx.variants.values()
            }
            write_json(run_dir / "manifest.json", manifest)
        summary.variants = dict(ctx.variants)
        summary.seconds = time.perf_counter() - started
        manifest["seconds"] = round(summary.seconds, 2)
        if main:
            write_json(run_dir / "manifest.json", manifest)
            _link(base / "latest", run_dir)
        return summary
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _run_or_reuse(
    definition: StageDef,
    cfg: StageConfig,
    ctx: Context,
    base: Path,
    force: bool,
    cache_only: bool = False,
    worker: bool = False,
) -> StageRecord:
    input_names = cfg.consumes(list(ctx.variants))
    missing = [name for name in input_names if name not in ctx.variants]
    if missing:
        raise ArtifactError(
            f"stage {cfg.label!r} needs variant(s) {', '.join(missing)}, which no earlier stage "
            "produced in this run"
        )
    inputs = ctx.inputs(input_names)
    key = stage_key(definition, cfg, inputs, ctx)
    entry = base / "cache" / f"{cfg.label}-{key[:16]}"
    partial = base / "cache" / ".partial" / entry.name
    tic = time.perf_counter()
    if worker:
        # Workers share the stage's work (a study in a shared database), so they run side by
        # side, each in a directory of its own, and only take the lock to commit.
        partial = partial.with_name(f"{entry.name}.worker-{os.getpid()}")
        log.info("stage %s: running as a worker (%s)", cfg.label, entry.name)
        result = _execute(definition, cfg, inputs, ctx, partial)
        with FileLock(str(_lock_file(base / "cache", entry.name))):
            _commit(partial, entry, result)
            result = _load_cached(entry, cfg.label, verify=False)
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
    with _entry_lock(_lock_file(base / "cache", entry.name), cfg.label):
        cached = None if force else _load_cached(entry, cfg.label)
        if cached is not None:
            log.info("stage %s: cached (%s)", cfg.label, entry.name)
            status, result = "cached", cached
        elif cache_only:
            raise _not_cached(cfg.label)
        else:
            log.info("stage %s: running (%s)", cfg.label, entry.name)
            if definition.needs_results:
                _sweep_abandoned(base / "cache", cfg.label, entry.name)
            result = _execute(definition, cfg, inputs, ctx, partial)
            _commit(partial, entry, result)
            result = _load_cached(entry, cfg.label, verify=False)
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


def _not_cached(label: str) -> ArtifactError:
    return ArtifactError(
        f"--only {label}... needs the output of stage {label!r}, which is not "
        "cached for this configuration; run the pipeline once without --only"
    )


def _lock_file(cache: Path, entry_name: str) -> Path:
    """The lock that gives one process at a time a cache entry (and its work directory)."""
    return cache / f".{entry_name}.lock"


@contextmanager
def _entry_lock(path: Path, label: str) -> Iterator[None]:
    """One writer per cache entry; a second run of the pipeline waits here, and says so."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning(
            "stage %s: another run is computing this stage (lock %s); waiting for it to finish, "
            "then its result is reused",
            label,
            path,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _sweep_abandoned(cache: Path, label: str, keep: str) -> None:
    """Remove work directories of this stage that no run can ever resume.

    A stage that reports on its run has the run id in its key, so the work directory a killed
    run left behind is never picked up again. One whose lock is free belongs to a run that is
    gone (a run still at work holds its lock); this run's own entry is kept.
    """
    for work in (cache / ".partial").glob(f"{label}-*"):
        if work.name == keep or not work.is_dir() or ".worker-" in work.name:
            continue
        lock_path = _lock_file(cache, work.name)
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # another run is writing it now
        try:
            shutil.rmtree(work, ignore_errors=True)
            log.info("stage %s: removed %s, left by an interrupted earlier run", label, work)
        finally:
            lock.release()
        lock_path.unlink(missing_ok=True)


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
            held.enter_context(_entry_lock(_lock_file(base / "cache", entry.name), cfg.label))
            if not force and _load_cached(entry, cfg.label) is not None:
                return "cached"
            if cache_only:
                raise _not_cached(cfg.label)
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
                    result = _execute(definition, cfg, inputs, ctx, workdir)
                except BaseException as exc:  # tell the other ranks before raising
                    error = exc
                distributed.check_peers(error)
                if error is not None:
                    raise error
            finally:
                if not main:
                    distributed.discard(workdir)
            distributed.on_main(lambda: _commit(partial, entry, result))
        elif status == "run":

            def alone() -> None:
                with distributed.solo():
                    result = _execute(definition, cfg, inputs, ctx, partial)
                _commit(partial, entry, result)

            distributed.on_main(alone)
        return ("cached" if status == "cached" else "ran"), _load_cached(entry, cfg.label, verify=False)


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


def _apply_tuned(cfg: StageConfig, settings: dict[str, Any] | None, pipeline: Pipeline) -> StageConfig:
    """The stage's config with the settings a tune stage chose (so they are in its cache key)."""
    if not settings:
        return cfg
    try:
        tuned = with_settings(cfg, settings, pipeline.config)
    except ValueError as exc:
        raise ConfigError(f"{pipeline.path}: stage {cfg.label!r}: invalid tuned settings: {exc}") from None
    log.info("stage %s: tuned settings %s", cfg.label, ", ".join(f"{k}={v!r}" for k, v in settings.items()))
    return tuned


def _stage_runner(ctx: Context, registry: dict[str, StageDef]):
    """``ctx.run_stage`` for tune stages: run a stage of this pipeline as a tuning trial.

    The stage gets its config with ``settings`` (YAML paths inside it) applied and validated
    by its own schema, a copy of the context with ``tuning=True``, the per-epoch hook, and a
    dataset whose test split raises when read. It writes only into ``out_dir``.
    """

    def run_stage(label: str, settings: dict[str, Any], out_dir: Path, on_epoch: Any = None) -> StageResult:
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
        trial_ctx = replace(
            ctx,
            variants=dict(ctx.variants),
            artifacts={k: dict(v) for k, v in ctx.artifacts.items()},
            results=dict(ctx.results),
            run_stage=None,
            log=_TRIAL_LOG,  # warnings only: the tune stage logs one line per trial
            tuning=True,
            on_epoch=on_epoch,
            _data=TuningBundle.wrap(ctx.data()),
        )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return registry[cfg.stage].run(cfg, trial_ctx.inputs(names), trial_ctx, out_dir)

    return run_stage


def stage_key(definition: StageDef, cfg: StageConfig, inputs: list[Variant], ctx: Context) -> str:
    data_spec = ctx.pipeline.config.data.model_dump(exclude={"root", "download"})
    return sha256_json(
        {
            "stage": definition.kind,
            "version": definition.version,
            "config": cfg.model_dump(mode="json", by_alias=True),
            "inputs": {v.name: _variant_hashes(v, ctx) for v in inputs},
            "seed": ctx.seed,
            "data": data_spec if definition.needs_data else None,
            "device": ctx.device.type,
            # a stage that reports on the run (run id, timings, other stages' results) is never reused
            **({"run_id": ctx.run_id} if definition.needs_results else {}),
            # what else the stage's output depends on (e.g. a tune stage: its target's config)
            **_cache_extras(cfg, ctx),
        }
    )


def _cache_extras(cfg: StageConfig, ctx: Context) -> dict[str, Any]:
    """Only a non-empty ``cache_extras`` enters the key, so adding the hook keeps old keys valid."""
    extras = cfg.cache_extras(ctx.pipeline.config) if hasattr(cfg, "cache_extras") else None
    return {"extras": extras} if extras else {}


def _variant_hashes(variant: Variant, ctx: Context) -> dict[str, str]:
    """The variant's own file and every artifact attached to it by earlier stages."""
    files = {"model": variant.file, **ctx.artifacts.get(variant.name, {})}
    for kind, path in files.items():
        if not Path(path).is_file():
            raise ArtifactError(
                f"the {kind} file of variant {variant.name!r} is missing: {path}; run the pipeline "
                f"again with --from {variant.stage or 'the stage that made it'} to remake it"
            )
    return {kind: sha256_file(path) for kind, path in sorted(files.items())}


def _execute(
    definition: StageDef, cfg: StageConfig, inputs: list[Variant], ctx: Context, workdir: Path
) -> StageResult:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "error.log").unlink(missing_ok=True)
    try:
        result = definition.run(cfg, inputs, ctx, workdir)
    except (CompressError, KeyboardInterrupt):
        raise
    except OSError as exc:
        storage = StorageError.from_os_error(exc, workdir)
        if storage is None:
            raise StageFailed(cfg.label, exc, _error_log(workdir, cfg.label)) from exc
        raise storage from None  # the CLI prints it (not logged: run.log may be on the full disk)
    except Exception as exc:
        raise StageFailed(cfg.label, exc, _error_log(workdir, cfg.label)) from exc
    for variant in result.variants:
        if not Path(variant.file).resolve().is_relative_to(workdir.resolve()):
            raise StageFailed(
                cfg.label,
                RuntimeError(f"variant file {variant.file} is outside the stage directory"),
                workdir / "error.log",
            )
    return result


def _error_log(workdir: Path, label: str) -> Path:
    """Log the exception being handled and keep its traceback in ``workdir/error.log``."""
    text = traceback.format_exc()
    log.error("stage %s failed:\n%s", label, text)
    try:
        write_text(workdir / "error.log", text)
    except OSError:  # e.g. the disk is full: the traceback is in the console output above
        pass
    return workdir / "error.log"


def _commit(partial: Path, entry: Path, result: StageResult) -> None:
    """Write result.json with every file's hash, then rename the work dir into the cache."""
    files = hash_tree(partial)
    files.pop("result.json", None)  # left by a commit that was killed before its rename
    write_json(
        partial / "result.json",
        {
            "variants": [v.to_json(partial) for v in result.variants],
            "artifacts": {
                name: {kind: Path(p).relative_to(partial).as_posix() for kind, p in files.items()}
                for name, files in result.artifacts.items()
            },
            "metrics": result.metrics,
            "publish": result.publish,
            "overrides": result.overrides,
            "files": files,
        },
    )
    faults.checkpoint(f"commit:{entry.name}", entry)
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(partial, entry)


def _load_cached(entry: Path, label: str, verify: bool = True) -> StageResult | None:
    result_file = entry / "result.json"
    if not result_file.is_file():
        return None
    try:
        data = read_json(result_file)
    except ValueError:
        log.warning("stage %s: cache entry %s has an unreadable result.json; re-running", label, entry)
        return None
    if verify:
        for relative, digest in data["files"].items():
            path = entry / relative
            if not path.is_file() or sha256_file(path) != digest:
                log.warning(
                    "stage %s: cached file %s was changed or removed since it was written; "
                    "re-running the stage",
                    label,
                    path,
                )
                return None
    return StageResult(
        variants=[Variant.from_json(v, entry) for v in data["variants"]],
        metrics=data["metrics"],
        publish=data.get("publish", {}),
        overrides=data.get("overrides", {}),
        artifacts={
            name: {kind: entry / p for kind, p in files.items()}
            for name, files in data.get("artifacts", {}).items()
        },
    )


def _publish(record: StageRecord, reports_dir: Path) -> None:
    for source, target in record.result.publish.items():
        destination = reports_dir / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")  # runs may publish at once
        shutil.copyfile(record.directory / source, tmp)
        os.replace(tmp, destination)


def _link(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")  # two runs may finish at once
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))
    os.replace(tmp, link)


def _make_run_dir(base: Path) -> str:
    """A new run directory with its ``stages/`` folder, and the cache's work folder; its id."""
    run_id = _new_run_id(base)
    (base / run_id / "stages").mkdir()
    (base / "cache" / ".partial").mkdir(parents=True, exist_ok=True)
    return run_id


def _new_run_id(base: Path) -> str:
    """A timestamp (-2, -3, ... for runs started in the same second); makes its directory.

    ``mkdir`` either creates the directory or fails, so two processes never share an id.
    """
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = stamp, 1
    while True:
        try:
            (base / candidate).mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{stamp}-{n}"


class _RunLogHandler(logging.FileHandler):
    """run.log; if it cannot be written (a full disk), one warning and the run goes on without it."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        self.failed = True
        print(f"warning: cannot write the run log {self.baseFilename}: {error.strerror}", file=sys.stderr)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # flushing onto a full disk: those lines are lost, the run's own error is not
            pass


def _attach_log_file(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _resolved(pipeline: Pipeline) -> dict[str, Any]:
    data = pipeline.config.model_dump(mode="json", by_alias=True, exclude={"stages"})
    data["name"] = pipeline.name
    data["stages"] = [s.model_dump(mode="json", by_alias=True) for s in pipeline.stages]
    return data


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in (
        "torch",
        "torchvision",
        "onnx",
        "onnxruntime",
        "torch-pruning",
        "optuna",
        "torchao",
        "compress",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _manifest_header(
    pipeline: Pipeline, run_id: str, device: torch.device, data_root: Path, data_source: str
) -> dict[str, Any]:
    return {
        "pipeline": pipeline.name,
        "pipeline_file": str(pipeline.path),
        "run_id": run_id,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": mask_secrets(" ".join(sys.argv)),  # e.g. --storage URL with a password
        "seed": pipeline.config.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        # training precision for ``precision: auto`` here (each training stage's is in its entry)
        "precision": resolve_precision(TrainingConfig(), device),
        "world_size": distributed.world_size(),  # processes under torchrun (1 without it)
        "distributed": distributed.describe() if distributed.initialized() else None,
        "data": {
            **pipeline.config.data.model_dump(mode="json"),
            "resolved_root": str(data_root),
            "root_source": data_source,
        },
        "versions": _versions(),
        "stages": [],
        "variants": {},
    }


def _manifest_entry(record: StageRecord, ctx: Context) -> dict[str, Any]:
    files = read_json(record.directory / "result.json")["files"]
    return {
        "name": record.label,
        "stage": record.kind,
        "status": record.status,
        "cache_key": record.key,
        "directory": str(record.directory),
        "seconds": round(record.seconds, 2),
        "inputs": {name: sha256_file(ctx.variants[name].file) for name in record.inputs},
        "outputs": {
            v.name: {
                "file": str(v.file),
                "sha256": files.get(Path(v.file).relative_to(record.directory).as_posix()),
            }
            for v in record.result.variants
        },
        "files": files,
        "metrics": _brief(record.result.metrics),
    }


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars only: long histories stay in the stage's own files, not in the manifest."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}
