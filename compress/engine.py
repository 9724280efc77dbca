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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock

from compress.config import Pipeline, StageConfig, did_you_mean
from compress.context import Context
from compress.data import resolve_root
from compress.errors import ArtifactError, CompressError, ConfigError
from compress.fileio import hash_tree, read_json, sha256_file, sha256_json, write_json, write_text
from compress.measure import cpu_model
from compress.stages import StageDef, load_stages
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


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device: 'cuda' was requested but no CUDA device is available; "
                "use --device auto or --device cpu"
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
    device = resolve_device(options.device or pipeline.config.device)
    data_root, data_source = resolve_root(options.data_root, pipeline.config.data.root, pipeline.path.parent)

    base = Path(options.artifacts_dir) / pipeline.name
    run_id = _new_run_id(base)
    run_dir = base / run_id
    try:
        (run_dir / "stages").mkdir(parents=True)
        (base / "cache" / ".partial").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(
            f"cannot create the run directory {run_dir} ({exc.strerror}); "
            "make the artifacts directory writable or free some disk space"
        ) from None
    handler = _attach_log_file(run_dir / "run.log")
    try:
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
            _link(run_dir / "stages" / cfg.label, record.directory)
            _publish(record, summary.reports_dir)
            manifest["stages"].append(_manifest_entry(record, ctx))
            if cfg.label in tuned:
                manifest["stages"][-1]["tuned_settings"] = tuned[cfg.label]
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
        with FileLock(str(base / "cache" / f".{entry.name}.lock")):
            _commit(partial, entry, result)
            result = _load_cached(entry, cfg.label, verify=False)
        return StageRecord(
            cfg.label, cfg.stage, "ran", time.perf_counter() - tic, key, entry, input_names,
            [v.name for v in result.variants], result,
        )  # fmt: skip
    with FileLock(str(base / "cache" / f".{entry.name}.lock")):
        cached = None if force else _load_cached(entry, cfg.label)
        if cached is not None:
            log.info("stage %s: cached (%s)", cfg.label, entry.name)
            status, result = "cached", cached
        elif cache_only:
            raise ArtifactError(
                f"--only {cfg.label}... needs the output of stage {cfg.label!r}, which is not "
                "cached for this configuration; run the pipeline once without --only"
            )
        else:
            log.info("stage %s: running (%s)", cfg.label, entry.name)
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
            **({"extras": cfg.cache_extras(ctx.pipeline.config)} if hasattr(cfg, "cache_extras") else {}),
        }
    )


def _variant_hashes(variant: Variant, ctx: Context) -> dict[str, str]:
    """The variant's own file and every artifact attached to it by earlier stages."""
    files = {"model": variant.file, **ctx.artifacts.get(variant.name, {})}
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
    except Exception as exc:
        text = traceback.format_exc()
        write_text(workdir / "error.log", text)
        log.error("stage %s failed:\n%s", cfg.label, text)
        raise StageFailed(cfg.label, exc, workdir / "error.log") from exc
    for variant in result.variants:
        if not Path(variant.file).resolve().is_relative_to(workdir.resolve()):
            raise StageFailed(
                cfg.label,
                RuntimeError(f"variant file {variant.file} is outside the stage directory"),
                workdir / "error.log",
            )
    return result


def _commit(partial: Path, entry: Path, result: StageResult) -> None:
    """Write result.json with every file's hash, then rename the work dir into the cache."""
    files = hash_tree(partial)
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
        tmp = destination.with_name(f".{destination.name}.tmp")
        shutil.copyfile(record.directory / source, tmp)
        os.replace(tmp, destination)


def _link(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))
    os.replace(tmp, link)


def _new_run_id(base: Path) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = stamp, 1
    while (base / candidate).exists():
        n += 1
        candidate = f"{stamp}-{n}"
    return candidate


def _attach_log_file(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
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
