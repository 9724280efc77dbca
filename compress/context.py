"""What the engine hands every stage: device, seed, data, logging and the other variants.

Stages never import the engine; anything they need from it (the data, the variants made so
far, a way to re-run another stage for tuning) comes through this object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.config import Pipeline
from compress.data import DataBundle, DataSource, load_data
from compress.variants import StageResult, Variant

# run_stage(target label, {YAML path inside that stage: value}, out_dir, on_epoch=None): runs a
# later stage of the pipeline with those settings as a tuning trial (validation data only).
StageRunner = Callable[..., StageResult]
EpochHook = Callable[[int, dict[str, Any]], None]


@dataclass
class Context:
    pipeline: Pipeline
    run_id: str
    run_dir: Path
    device: torch.device
    data_root: Path
    data_source: str  # where the root came from: --data-root, COMPRESS_DATA_ROOT, data.root, ...
    # the data found and checked before the run started (None when no stage reads data)
    prepared: DataSource | None = None
    variants: dict[str, Variant] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Path]] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("compress"))
    run_stage: StageRunner | None = None
    # run_step(stage kind, settings, input variants, out_dir, on_epoch=None, train_images=None):
    # runs a stage kind that is not in the pipeline as one step of a search trial's chain
    # (validation data only; on the first train_images training images when given)
    run_step: StageRunner | None = None
    # stage_workdir(target label, settings): a context manager giving the work directory that
    # stage will use with those settings (None if it is cached or busy), for a confirmation run
    # whose training the stage then resumes instead of repeating (engine.trials.stage_workdir).
    stage_workdir: Callable[..., AbstractContextManager[Path | None]] | None = None
    # True inside a tuning trial: the test split is off limits (ctx.data().test raises), so a
    # stage must skip its test evaluation; its scores come from the validation split.
    tuning: bool = False
    # Pass as ``training.FitSettings(on_epoch=ctx.on_epoch)``: a tuning trial reports each epoch's
    # validation accuracy through it, and its pruner may stop the trial early.
    on_epoch: EpochHook | None = None
    # True for ``--worker`` processes that share one study with others.
    worker: bool = False
    # read-only views for stages that report on the run (the report and gates stages):
    # stage label -> its result, so far; a benchmark's results table is its declared output
    # ``results[label].table`` (see compress.results), never looked up in its directory
    results: dict[str, StageResult] = field(default_factory=dict)
    # stage label -> {name it publishes under reports/<pipeline>/: the file in that stage's output},
    # so a later stage reads this run's published files as declared outputs, not from reports/
    published: dict[str, dict[str, Path]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)  # the run manifest as written so far
    reports_dir: Path | None = None  # reports/<pipeline>/ (published files of earlier runs are there)
    _data: DataBundle | None = None

    @property
    def seed(self) -> int:
        return self.pipeline.config.seed

    def data(self) -> DataBundle:
        """The dataset, loaded on first use so fully cached runs never touch it."""
        if self._data is None:
            self._data = load_data(
                self.pipeline.config.data, self.data_root, self.data_source, prepared=self.prepared
            )
        return self._data

    def inputs(self, names: list[str]) -> list[Variant]:
        return [self.variants[name] for name in names]
