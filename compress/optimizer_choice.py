"""The train stage's optimizer when the YAML leaves it out and the run is short: a probe.

No one optimizer and rate trains every architecture in the few steps of a short run. Measured
(one epoch on 2,000 MNIST images at 32 px, 3 channels, batch 16, test accuracy): SGD 0.05 gives
MobileNetV3-small 88 % but EfficientNet-B0 22 % and RegNetX-400MF 28 %; SGD 0.01 gives those two
74 % and 76 % but MobileNetV3-small 41 %; SqueezeNet learns only under AdamW 3e-4 (README,
"Training defaults"). So when the optimizer is left out and the run would take fewer than
``training_defaults.MIN_STEPS`` steps at batch 128 (the case where the batch size is halved too),
each candidate below trains a copy of the model, from the same initial weights and seed, for the
same epochs on the first third of the training images, and the one with the best validation
accuracy (after BatchNorm adaptation) trains the model. Ties go to the earlier candidate, so a
model that learns under the usual SGD 0.05 keeps it; when every candidate is still at chance,
the lowest validation loss decides (``_best``).

A run on full-size data (MNIST: 469 steps an epoch at 128) never probes, so its measured
settings stand; an optimizer set in the YAML, even only its name, is used as it is. The choice
is kept in the work directory (a resumed fit does not probe again) and recorded in the stage's
``training_settings``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from compress import distributed
from compress.config import TrainingConfig
from compress.config.sections import OptimizerConfig
from compress.data import DataBundle
from compress.fileio import read_json, write_json
from compress.gating.chance import CHANCE_MARGIN_PP, above_chance_pp
from compress.training import FitResult, FitSettings, fit
from compress.training_defaults import too_few_steps

log = logging.getLogger(__name__)

# (optimizer, peak rate, weight decay), the usual SGD first: it wins ties
CANDIDATES: tuple[tuple[str, float, float], ...] = (
    ("sgd", 0.05, 5e-4),
    ("sgd", 0.01, 5e-4),
    ("adamw", 1e-3, 0.05),
    ("adamw", 3e-4, 0.05),
)
SHARE = 1 / 3  # of the training images each candidate trains on


def needs_probe(cfg: TrainingConfig, train_images: int, val_images: int) -> bool:
    """True when the optimizer is left out, the run is short, and there is validation data to
    score the candidates on (under torchrun every process would probe alone: it is skipped)."""
    if "optimizer" in cfg.model_fields_set or val_images == 0 or distributed.active():
        return False
    return too_few_steps(cfg.epochs, train_images)


def choose_optimizer(
    model: nn.Module, bundle: DataBundle, settings: FitSettings
) -> tuple[TrainingConfig, dict[str, Any] | None]:
    """``settings.cfg`` with the probed optimizer, and the probe's record (None: no probe)."""
    cfg = settings.cfg
    if not needs_probe(cfg, len(bundle.train), len(bundle.val)):
        return cfg, None
    saved = settings.workdir / "optimizer_probe.json"
    if saved.is_file():
        record = read_json(saved)
        log.info("%s: optimizer %s, as the probe chose before the resume", settings.desc, record["chosen"])
    else:
        record = _probe(model, bundle, settings)
        settings.workdir.mkdir(parents=True, exist_ok=True)
        write_json(saved, record)
    chosen = record["chosen"]
    return _with_optimizer(cfg, chosen["name"], chosen["lr"], chosen["weight_decay"]), record


def _with_optimizer(cfg: TrainingConfig, name: str, lr: float, weight_decay: float) -> TrainingConfig:
    optimizer = OptimizerConfig(name=name, lr=lr, weight_decay=weight_decay)
    return cfg.model_copy(update={"optimizer": optimizer})


def _probe(model: nn.Module, bundle: DataBundle, settings: FitSettings) -> dict[str, Any]:
    images = max(1, round(len(bundle.train) * SHARE))
    subset = dataclasses.replace(bundle, train=bundle.train.head(images))
    tried = []
    for name, lr, weight_decay in CANDIDATES:
        candidate = _with_optimizer(settings.cfg, name, lr, weight_decay)
        trial = copy.deepcopy(model)  # the model itself keeps its initial weights for the real fit
        with tempfile.TemporaryDirectory() as work:
            run = FitSettings(
                candidate,
                settings.device,
                settings.seed,
                Path(work),
                desc=f"{settings.desc} probe {name} {lr:g}",
            )
            result = fit(trial, subset, run)
        loss = result.history[-1]["val_loss"] if result.history else None
        row = {"name": name, "lr": lr, "weight_decay": weight_decay, "val_accuracy": result.val_accuracy}
        tried.append({**row, "val_loss": loss})
    best = _best(tried, bundle.num_classes)
    log.info(
        "%s: optimizer left out on a short run: probed %s on %s of %s training images; training with %s %g",
        settings.desc,
        ", ".join(f"{t['name']} {t['lr']:g} {100 * (t['val_accuracy'] or 0):.1f} %" for t in tried),
        f"{images:,}",
        f"{len(bundle.train):,}",
        best["name"],
        best["lr"],
    )
    return {"images": images, "candidates": tried, "chosen": best}


def _ranked(tried: list[dict[str, Any]], classes: int) -> list[dict[str, Any]]:
    """The candidates best first: by validation accuracy, the earlier candidate on a tie; when
    none scores more than ``CHANCE_MARGIN_PP`` above chance their accuracies are noise, and the
    lowest validation loss tells which one has started to learn (SqueezeNet, one epoch on 2,000
    images: all four within 5 pp of 10 % after a third of it; AdamW 3e-4, at 10.1 %, had the
    lowest loss, 2.298, and reached 48.2 % at the end)."""
    accuracy = [t["val_accuracy"] or 0.0 for t in tried]
    if 100 * (max(accuracy) - 1 / classes) > CHANCE_MARGIN_PP or any(t["val_loss"] is None for t in tried):
        order = sorted(range(len(tried)), key=lambda i: (-accuracy[i], i))
    else:
        order = sorted(range(len(tried)), key=lambda i: (tried[i]["val_loss"], i))
    return [tried[i] for i in order]


def _best(tried: list[dict[str, Any]], classes: int) -> dict[str, Any]:
    return _ranked(tried, classes)[0]


def fit_with_choice(
    model: nn.Module, bundle: DataBundle, settings: FitSettings
) -> tuple[FitResult, dict | None]:
    """``fit`` with the probed optimizer, and the probe's record (None: no probe).

    A third of the data is a short horizon: VGG-11 (one epoch on 2,000 images at 32 px) led the
    probe under SGD 0.05 (18.5 % val after a third) and ended the epoch at chance (12 %), where
    the runner-up, SGD 0.01, reaches 67.2 %. So when the probed choice ends at chance, the model
    trains once more from the same initial weights with the runner-up (in its own work
    directory, so a resumed run resumes whichever fit it was at)."""
    chosen, probe = choose_optimizer(model, bundle, settings)
    if probe is None:
        return fit(model, bundle, dataclasses.replace(settings, cfg=chosen)), None
    initial = copy.deepcopy(model.state_dict())
    result = fit(model, bundle, dataclasses.replace(settings, cfg=chosen))
    classes = bundle.num_classes
    above = above_chance_pp({"accuracy": result.val_accuracy}, classes)
    if above is None or above > CHANCE_MARGIN_PP:
        return result, probe
    first = probe["chosen"]
    ranked = [
        t
        for t in _ranked(probe["candidates"], classes)
        if (t["name"], t["lr"]) != (first["name"], first["lr"])
    ]
    if not ranked:
        return result, probe
    second = ranked[0]
    log.warning(
        "%s: %s %g ended at chance (val %.1f %%); training again from the same initial weights "
        "with the probe's runner-up, %s %g",
        settings.desc,
        first["name"],
        first["lr"],
        100 * (result.val_accuracy or 0.0),
        second["name"],
        second["lr"],
    )
    model.load_state_dict(initial)
    retry = _with_optimizer(settings.cfg, second["name"], second["lr"], second["weight_decay"])
    again = fit(
        model, bundle, dataclasses.replace(settings, cfg=retry, workdir=settings.workdir / "runner-up")
    )
    probe = {**probe, "at_chance": {**first, "val_accuracy_after_fit": result.val_accuracy}, "chosen": second}
    return again, probe
