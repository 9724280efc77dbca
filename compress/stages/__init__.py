"""The stage registry: each module in this package registers its stages by YAML name.

Adding a stage means adding one module here; nothing else needs editing, because the
registry is filled by importing every module of the package.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compress.config import StageConfig
from compress.context import Context
from compress.variants import StageResult, Variant

StageFn = Callable[[StageConfig, list[Variant], Context, Path], StageResult]


@dataclass(frozen=True)
class StageDef:
    kind: str
    config: type[StageConfig]
    run: StageFn
    version: int
    needs_data: bool
    needs_results: bool = False  # reads ctx.results/ctx.manifest: re-runs every run (run id in its key)
    # runs on every rank under torchrun (training under DDP); other stages run on rank 0 only
    distributed: bool = False
    # reads nothing but its input variants and the data: it may run in a second process beside
    # the stage before it (compress.engine.ahead)
    concurrent: bool = False


REGISTRY: dict[str, StageDef] = {}


def stage(
    kind: str,
    config: type[StageConfig],
    version: int = 1,
    needs_data: bool = True,
    needs_results: bool = False,
    distributed: bool = False,
    concurrent: bool = False,
) -> Callable[[StageFn], StageFn]:
    """Register ``run(cfg, inputs, ctx, out_dir) -> StageResult`` under ``kind``.

    Bump ``version`` when a change alters what the stage produces: it is part of the cache
    key, so old cached results are not reused. ``distributed=True`` marks a stage that trains
    through ``training.fit``/``evaluate``: under torchrun every rank runs it (see
    ``compress.distributed``); any other stage runs on rank 0 alone. ``concurrent=True`` marks a
    stage that reads only its input variants and the data, which may run ahead in a second
    process (``compress.engine.ahead``).
    """

    def register(fn: StageFn) -> StageFn:
        if kind in REGISTRY:
            raise RuntimeError(f"stage {kind!r} registered twice")
        REGISTRY[kind] = StageDef(
            kind, config, fn, version, needs_data, needs_results, distributed, concurrent
        )
        return fn

    return register


def load_stages() -> dict[str, StageDef]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return REGISTRY


def config_registry() -> dict[str, type[StageConfig]]:
    return {kind: d.config for kind, d in load_stages().items()}
