"""One stage, once: reused from the cache, run in its work directory and committed, run as one
of several ``--worker`` processes sharing its study, or, under torchrun, decided by rank 0 and
run on every rank (``run_on_ranks``). The runner (``engine.runner``) decides the order.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path

from filelock import FileLock

from compress import distributed
from compress.config import StageConfig
from compress.context import Context
from compress.engine import cache
from compress.engine.execute import execute
from compress.engine.records import StageRecord
from compress.errors import ArtifactError
from compress.stages import StageDef
from compress.variants import StageResult, Variant

log = logging.getLogger("compress")


def run_or_reuse(
    definition: StageDef,
    cfg: StageConfig,
    ctx: Context,
    base: Path,
    force: bool,
    cache_only: bool = False,
    worker: bool = False,
    wait: bool = True,
) -> StageRecord:
    """Stage ``cfg`` reused or run: ``force`` ignores the cache, ``cache_only`` refuses to run,
    ``worker`` runs beside other processes of a shared study, ``wait=False`` raises
    ``cache.Busy`` when another process holds the entry."""
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
        status, result = run_on_ranks(definition, cfg, inputs, ctx, base, entry, partial, force, cache_only)
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
            made = {"run": str(ctx.run_dir), "seconds": round(time.perf_counter() - tic, 2)}
            cache.commit(partial, entry, result, made)
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


def run_on_ranks(
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
