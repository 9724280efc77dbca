"""BatchNorm adaptation: a model's running statistics re-estimated on training images.

A BatchNorm layer normalises with its batch's statistics while training and with its running
averages in eval mode. Those averages lag the weights: with torchvision's MobileNetV3 momentum
(0.01) a 100-step run leaves them mostly at their initial values, and the model scores chance
in eval mode although it trains well. Pruning and quantization shift every layer's inputs the
same way. So, as NNCF does after compression, the statistics are re-estimated with the final
weights: a cumulative average over a fixed number of seeded training batches
(``torch.optim.swa_utils.update_bn``), which depends only on the weights, the data and the
seed, so a resumed run re-estimates exactly what an uninterrupted one did.

The effect is measured on the validation split and the re-estimate is kept only when it is not
worse there: a model whose own statistics are already good never loses accuracy to it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from compress import distributed
from compress.config import BN_ADAPT_BATCHES
from compress.data import DataBundle, iterate_batches
from compress.layout import channels_last, is_conv_net
from compress.measure import evaluate
from compress.training_defaults import DEFAULT_BATCH


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The layers whose running statistics eval mode uses (``track_running_stats``)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


class _NormsTrainOnly(nn.Module):
    """``model`` with only its BatchNorm layers in training mode when ``update_bn`` trains it:
    dropout stays off, so the statistics are those of the inputs eval mode will see."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> _NormsTrainOnly:
        self.training = mode
        for module in self.model.modules():
            module.training = mode and isinstance(module, _BatchNorm)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def adapt_batchnorm(
    model: nn.Module,
    bundle: DataBundle,
    device: torch.device,
    batches: int = BN_ADAPT_BATCHES,
    seed: int = 0,
    desc: str = "batchnorm",
    batch_size: int | None = None,
    logger: logging.Logger | None = None,
    val_before: float | None = None,
) -> dict[str, Any] | None:
    """Re-estimate ``model``'s BatchNorm statistics in place on ``batches`` training batches.

    Returns None, without a forward pass or an evaluation, when the model has no BatchNorm
    layer or ``batches`` is 0. Otherwise returns what the caller records: layers, batches,
    images, validation accuracy before and after, and whether the new statistics were kept.
    ``val_before`` is the model's validation accuracy if the caller has just measured it.
    Under torchrun every rank adapts on the same batches and ends with rank 0's statistics.
    """
    layers = batchnorm_layers(model)
    if not layers or batches <= 0:
        return None
    log = logger or logging.getLogger("compress")
    size = batch_size or DEFAULT_BATCH
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    flags = {m: m.training for m in model.modules()}
    has_val = len(bundle.val) > 0
    model.to(device)
    if has_val and val_before is None:
        val_before = _val_accuracy(model, bundle, device)
    tic = time.perf_counter()
    counted = {"batches": 0, "images": 0}
    try:
        with channels_last(model):
            inputs = _inputs(bundle, size, device, batches, seed, is_conv_net(model), counted)
            update_bn(inputs, _NormsTrainOnly(model))
    except BaseException:
        _restore(layers, saved)
        raise
    finally:
        for module, flag in flags.items():
            module.training = flag
    _sync(layers)
    seconds = time.perf_counter() - tic
    val_after = _val_accuracy(model, bundle, device) if has_val else None
    kept = val_after is None or val_before is None or val_after >= val_before
    if not kept:  # (the same decision on every rank: the accuracy is summed over them)
        _restore(layers, saved)
        _sync(layers)  # DDP's last step left each rank its own statistics
    for module, flag in flags.items():
        module.training = flag
    record = {
        "layers": len(layers),
        "batches": counted["batches"],
        "images": counted["images"],
        "val_accuracy_before": val_before,
        "val_accuracy_after": val_after,
        "kept": kept,
        "seconds": round(seconds, 2),
    }
    log.info("%s", describe(record, desc))
    return record


def describe(record: dict[str, Any], desc: str) -> str:
    """The log line: what was re-estimated and what it did to validation accuracy."""
    head = (
        f"{desc}: batchnorm re-estimated in {record['layers']} layers over {record['batches']} batches "
        f"({record['images']:,} training images)"
    )
    before, after = record["val_accuracy_before"], record["val_accuracy_after"]
    if after is None:
        return f"{head}: no validation split to measure it on"
    effect = f"{head}: validation accuracy {before * 100:.1f} % -> {after * 100:.1f} %"
    return effect if record["kept"] else f"{effect}; kept the trained statistics (they score higher)"


def _inputs(
    bundle: DataBundle,
    batch_size: int,
    device: torch.device,
    batches: int,
    seed: int,
    nhwc: bool,
    counted: dict[str, int],
) -> Iterator[torch.Tensor]:
    """The first ``batches`` batches of a seeded shuffle of the training split, unaugmented.

    A one-image batch is skipped (unless it is all there is): a BatchNorm layer cannot take
    statistics of a single value per channel.
    """
    stream = iterate_batches(
        bundle, bundle.train, batch_size, device, shuffle=True, seed=seed, augment="none"
    )
    for x, _ in itertools.islice(stream, batches):
        if len(x) < 2 and counted["batches"]:
            continue
        counted["batches"] += 1
        counted["images"] += len(x)
        yield x.contiguous(memory_format=torch.channels_last) if nhwc else x


def _val_accuracy(model: nn.Module, bundle: DataBundle, device: torch.device) -> float:
    return evaluate(model, bundle, bundle.val, device)["accuracy"]


def _restore(layers: list[_BatchNorm], saved: list[tuple[torch.Tensor, ...]]) -> None:
    for module, (mean, var, tracked) in zip(layers, saved, strict=True):
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
        module.num_batches_tracked.copy_(tracked)


def _sync(layers: list[_BatchNorm]) -> None:
    """Rank 0's statistics on every rank (under torchrun; nothing otherwise)."""
    distributed.broadcast_tensors([t for m in layers for t in (m.running_mean, m.running_var)])
