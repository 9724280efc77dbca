"""The training settings a run derives from its data when the YAML leaves them open.

The train stage's ``batch_size`` left out (``baseline_batch_size``): 128, halved (down to 16)
while the run would take fewer than ``MIN_STEPS`` optimizer steps. A network trained from
scratch needs steps more than it needs large batches; at 128, one epoch on 2,000 images is 16
steps, which left MobileNetV3-small at 20 % and ResNet-18 at 64 % on MNIST at 32 px, where
batch 16 (125 steps) reached 88 % and 91 % (README, "Training defaults"). Full-size data sets
keep 128. Fine-tuning and distillation keep 128: their settings were measured there, and a
distillation loss (T^2 x KL) at lr 0.05 diverged at batch 16 where it learns at 128.

``optimizer.lr: auto`` (any training): the learning-rate range test (``compress.lr_find``),
run once before the first epoch and remembered in the work directory, so a resumed fit trains
with the rate the interrupted one chose.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compress import distributed, lr_find
from compress.config import TrainingConfig
from compress.data import DataBundle
from compress.fileio import read_json, write_json


class FitRun(Protocol):
    """What ``resolve`` reads of ``training.FitSettings``; named here, not imported, because
    ``training`` (and ``batchnorm`` below it) import this module."""

    cfg: TrainingConfig
    device: torch.device
    seed: int
    workdir: Path
    desc: str


log = logging.getLogger(__name__)

DEFAULT_BATCH = 128
SMALLEST_AUTO_BATCH = 16
MIN_STEPS = 100
# lr auto when the range test finds nothing: the rate each optimizer is usually run at
FALLBACK_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}


def too_few_steps(epochs: int, train_images: int, batch: int = DEFAULT_BATCH) -> bool:
    """Whether ``epochs`` over ``train_images`` at ``batch`` take fewer than ``MIN_STEPS`` steps:
    a short run, which gets a smaller batch (``baseline_batch_size``) and, with the optimizer left
    out, a probed one (``compress.optimizer_choice``)."""
    return epochs * math.ceil(train_images / batch) < MIN_STEPS


def baseline_batch_size(cfg: TrainingConfig, train_images: int, desc: str = "train") -> TrainingConfig:
    """``cfg`` with the batch the train stage uses on ``train_images`` images: its own, or the
    rule above (said in the log when it is not 128).

    Under torchrun the automatic batch stays a multiple of the process count (it is the
    global batch, split evenly across processes).
    """
    if cfg.batch_size:
        return cfg
    size = DEFAULT_BATCH
    while size > SMALLEST_AUTO_BATCH and too_few_steps(cfg.epochs, train_images, size):
        size //= 2
    world = distributed.world_size() if distributed.active() else 1
    size = max(world, size - size % world)
    if size != DEFAULT_BATCH:
        log.info(
            "%s: batch_size %d (%s training images x %d epochs would be fewer than %d steps at %d)",
            desc,
            size,
            f"{train_images:,}",
            cfg.epochs,
            MIN_STEPS,
            DEFAULT_BATCH,
        )
    return cfg.model_copy(update={"batch_size": size})


def resolve(
    settings: FitRun,
    model: nn.Module,
    bundle: DataBundle,
    make_optimizer: Callable[[nn.Module, TrainingConfig], torch.optim.Optimizer],
) -> tuple[TrainingConfig, dict[str, Any]]:
    """``settings.cfg`` with a concrete batch size and learning rate, and a record of what was
    derived (the range test runs on ``settings``' device and seed, and is kept in its workdir).

    The record (``{"batch_size": ..., "lr_auto": {...}}``) goes into the stage's metrics so the
    run says which values it chose and why. The batch is ``cfg``'s or 128 (the train stage sets
    its own first: ``baseline_batch_size``).
    """
    cfg, desc, workdir = settings.cfg, settings.desc, settings.workdir
    batch = cfg.batch_size or DEFAULT_BATCH
    record: dict[str, Any] = {"batch_size": batch}
    cfg = cfg.model_copy(update={"batch_size": batch})
    if cfg.optimizer.lr != "auto":
        return cfg, record
    saved = workdir / "lr_find.json"  # a resumed fit trains with the rate the interrupted one chose
    probe = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"lr": lr_find.MIN_LR})})

    def range_test() -> dict[str, Any]:
        if saved.is_file():
            found = read_json(saved)
            log.info("%s: lr auto: %.2e, as the range test chose before the resume", desc, found["lr"])
            return found
        found = lr_find.range_test(
            model,
            bundle,
            lambda m: make_optimizer(m, probe),
            batch,
            cfg.augment,
            settings.device,
            settings.seed,
            desc,
        ).as_dict()
        workdir.mkdir(parents=True, exist_ok=True)
        write_json(saved, found)
        return found

    found = distributed.on_main(range_test)  # rank 0 runs it (and keeps the file); every rank takes its rate
    lr = found["lr"]
    if lr is None:  # the loss never fell: the optimizer's usual rate, said in the log
        lr = FALLBACK_LR[cfg.optimizer.name]
        log.warning(
            "%s: lr auto: training with %s's usual rate, lr %g, instead", desc, cfg.optimizer.name, lr
        )
    record["lr_auto"] = {**{k: found[k] for k in ("lr", "lr_at_minimum", "steps")}, "used": lr}
    optimizer = cfg.optimizer.model_copy(update={"lr": lr})
    return cfg.model_copy(update={"optimizer": optimizer}), record
