"""The stage cache: keys, locks, commit and reuse.

A stage's key hashes its kind and version, its config, its inputs' file hashes, the seed,
the data spec and the device type. A stage runs in ``cache/.partial/`` and is renamed into
``cache/`` only when complete (``commit``), so a failed or killed stage is never a cache
hit; a cached entry is reused only if every file still has the hash it was committed with.
One process at a time works on an entry (``entry_lock``); another run of the same pipeline
waits for it and then reuses its result.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from compress import faults
from compress.config import StageConfig
from compress.config.data import LOADING_ONLY
from compress.context import Context
from compress.errors import ArtifactError
from compress.fileio import hash_tree, read_json, sha256_file, sha256_json, write_json
from compress.stages import StageDef
from compress.variants import StageResult, Variant

log = logging.getLogger("compress")


def stage_key(definition: StageDef, cfg: StageConfig, inputs: list[Variant], ctx: Context) -> str:
    data = None
    if definition.needs_data:  # what the data is (its files' fingerprint), not where it lives
        spec = ctx.pipeline.config.data.model_dump(mode="json", exclude=set(LOADING_ONLY))
        data = {**spec, "fingerprint": ctx.prepared.fingerprint if ctx.prepared else None}
    return sha256_json(
        {
            "stage": definition.kind,
            "version": definition.version,
            "config": cfg.model_dump(mode="json", by_alias=True),
            "inputs": {v.name: variant_hashes(v, ctx) for v in inputs},
            "seed": ctx.seed,
            "data": data,
            "device": ctx.device.type,
            # a stage that reports on the run (run id, timings, other stages' results) is never reused
            **({"run_id": ctx.run_id} if definition.needs_results else {}),
            # what else the stage's output depends on (e.g. a tune stage: its target's config)
            **_cache_extras(cfg, ctx),
        }
    )


def entry_paths(base: Path, label: str, key: str) -> tuple[Path, Path]:
    """A stage's cache entry and the work directory it is made in (renamed into place by
    ``commit``; a run that stopped half-way resumes from what is left there)."""
    entry = base / "cache" / f"{label}-{key[:16]}"
    return entry, base / "cache" / ".partial" / entry.name


def _cache_extras(cfg: StageConfig, ctx: Context) -> dict[str, Any]:
    """Only a non-empty ``cache_extras`` enters the key, so adding the hook keeps old keys valid."""
    extras = cfg.cache_extras(ctx.pipeline.config) if hasattr(cfg, "cache_extras") else None
    return {"extras": extras} if extras else {}


def variant_hashes(variant: Variant, ctx: Context) -> dict[str, str]:
    """The variant's own file and every artifact attached to it by earlier stages."""
    files = {"model": variant.file, **ctx.artifacts.get(variant.name, {})}
    for kind, path in files.items():
        if not Path(path).is_file():
            raise ArtifactError(
                f"the {kind} file of variant {variant.name!r} is missing: {path}; run the pipeline "
                f"again with --from {variant.stage or 'the stage that made it'} to remake it"
            )
    return {kind: sha256_file(path) for kind, path in sorted(files.items())}


def commit(partial: Path, entry: Path, result: StageResult, made: dict[str, Any] | None = None) -> None:
    """Write result.json with every file's hash, then rename the work dir into the cache.

    ``made`` says which run made the entry and in how many seconds: a run that finds an entry
    its own second process committed (``engine.ahead``) counts it as run, with no race between
    the commit and a separate marker."""
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
            "table": Path(result.table).relative_to(partial).as_posix() if result.table else None,
            "files": files,
            "made": made or {},
        },
    )
    faults.checkpoint(f"commit:{entry.name}", entry)
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(partial, entry)


def load_cached(entry: Path, label: str, verify: bool = True) -> StageResult | None:
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
        table=entry / data["table"] if data.get("table") else None,
        made=data.get("made", {}),
        artifacts={
            name: {kind: entry / p for kind, p in files.items()}
            for name, files in data.get("artifacts", {}).items()
        },
    )


def not_cached_error(label: str) -> ArtifactError:
    return ArtifactError(
        f"--only {label}... needs the output of stage {label!r}, which is not "
        "cached for this configuration; run the pipeline once without --only"
    )


def lock_file(cache: Path, entry_name: str) -> Path:
    """The lock that gives one process at a time a cache entry (and its work directory)."""
    return cache / f".{entry_name}.lock"


class Busy(Exception):
    """Another process holds the entry's lock and ``wait=False`` was asked for."""


@contextmanager
def entry_lock(path: Path, label: str, wait: bool = True) -> Iterator[None]:
    """One writer per cache entry; a second run of the pipeline waits here, and says so (or,
    with ``wait=False``, raises ``Busy`` so the caller can do something else first)."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise Busy(label) from None
        log.info(
            "stage %s: another process is computing this stage (lock %s): a second run, or this "
            "run working ahead; waiting for it to finish, then its result is reused",
            label,
            path,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def sweep_abandoned(cache: Path, label: str, keep: str) -> None:
    """Remove work directories of this stage that no run can ever resume.

    A stage that reports on its run has the run id in its key, so the work directory a killed
    run left behind is never picked up again. One whose lock is free belongs to a run that is
    gone (a run still at work holds its lock); this run's own entry is kept.
    """
    for work in (cache / ".partial").glob(f"{label}-*"):
        if work.name == keep or not work.is_dir() or ".worker-" in work.name:
            continue
        lock_path = lock_file(cache, work.name)
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
