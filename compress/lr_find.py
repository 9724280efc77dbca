"""``optimizer.lr: auto``: a learning-rate range test (Smith 2017; Lightning's ``lr_find``).

A model a user brings has no known good learning rate, and a wrong one either leaves it at
chance (too low for a short run) or kills it (too high: the loss sticks at ln C). The range
test trains a throw-away copy for a few dozen steps while the rate grows exponentially from
``MIN_LR`` to ``MAX_LR``, and stops once the loss diverges. The rate that gave the lowest
smoothed loss is where training starts to break down; a tenth of it (fastai's "minimum / 10"
rule) is the peak rate the schedule then uses.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compress.data import DataBundle, iterate_batches
from compress.layout import channels_last, is_conv_net

log = logging.getLogger(__name__)

MIN_LR, MAX_LR = 1e-6, 1.0
STEPS = 60  # 60 rates over six decades: ten per decade
SMOOTHING = 0.9  # exponential moving average of the loss (bias-corrected)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of the best one
SHARE_OF_MINIMUM = 0.1  # the chosen rate: a tenth of the rate at the loss minimum
# the minimum counts only if the smoothed loss fell at least this far below its start: a flat or
# only rising curve has its "minimum" at noise in the first steps (RegNetX-400MF: at 1e-6)
REAL_DIP = 0.95


@dataclass
class RangeTest:
    """What the range test saw and chose; kept in the stage's metrics so the choice is visible."""

    lr: float | None  # the chosen peak rate; None: the loss never fell, the test found nothing
    lr_at_minimum: float | None
    steps: int  # steps run before the loss diverged or the rates ran out
    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed

    def as_dict(self) -> dict:
        return asdict(self)


def _batches(bundle: DataBundle, batch_size: int, device: torch.device, seed: int, augment: str):
    """Training batches without end: the split again, reshuffled, when a short one runs out."""
    round_ = 0
    while True:
        yield from iterate_batches(
            bundle, bundle.train, batch_size, device, shuffle=True, seed=seed + round_, augment=augment
        )
        round_ += 1


def range_test(
    model: nn.Module,
    bundle: DataBundle,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batch_size: int,
    augment: str,
    device: torch.device,
    seed: int,
    desc: str = "train",
) -> RangeTest:
    """The peak learning rate for ``model`` on this data (``model`` itself is not changed).

    Runs on a copy, on training images only, with the stage's optimizer (``make_optimizer``
    builds it for a model: kind, momentum, weight decay), batch size and augmentation, and plain
    cross-entropy on the labels.
    """
    trial = copy.deepcopy(model).to(device).train()
    optimizer = make_optimizer(trial)
    growth = (MAX_LR / MIN_LR) ** (1 / (STEPS - 1))
    rates: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # dropout in the copy: the same draws every time the test runs
    nhwc = is_conv_net(trial)
    with channels_last(trial):
        batches = _batches(bundle, batch_size, device, seed, augment)
        for step in range(STEPS):
            lr = MIN_LR * growth**step
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = next(batches)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(trial(x).float(), y)
            if not torch.isfinite(loss):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            average = SMOOTHING * average + (1 - SMOOTHING) * loss.item()
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            rates.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if step > 5 and smoothed > DIVERGED * best:
                break
    torch.random.set_rng_state(generator_state)
    del trial, optimizer
    if len(losses) < 2 or min(losses) > REAL_DIP * losses[0]:
        log.warning(
            "%s: lr auto: the range test found no rate at which the loss falls (%d steps, lr %.0e to %.0e, "
            "batch %d, loss %s)",
            desc,
            len(losses),
            MIN_LR,
            rates[-1] if rates else MIN_LR,
            batch_size,
            f"{losses[0]:.3f} -> {min(losses):.3f} at best" if losses else "not finite at once",
        )
        return RangeTest(None, None, len(losses), rates, losses)
    at_minimum = rates[losses.index(min(losses))]
    chosen = max(MIN_LR, at_minimum * SHARE_OF_MINIMUM)
    log.info(
        "%s: lr auto: range test over %d steps (lr %.0e to %.0e, batch %d): lowest loss %.3f at lr %.2e; "
        "training peaks at a tenth of it, lr %.2e",
        desc,
        len(losses),
        MIN_LR,
        rates[-1],
        batch_size,
        min(losses),
        at_minimum,
        chosen,
    )
    return RangeTest(chosen, at_minimum, len(losses), rates, losses)
