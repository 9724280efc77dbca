"""Batches for training and evaluation: seeded order, per-image augmentation, normalisation.

In-memory images are sliced straight from their uint8 tensor (no DataLoader: on a CPU that is
faster than any worker pool for small images); images that stream from disk are decoded by
DataLoader workers in the same seeded order, so both give the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from compress.data.bundle import DataBundle, Split
from compress.data.images import DiskImages, decoded_batches
from compress.errors import DataError


def iterate_batches(
    bundle: DataBundle,
    split: Split,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: str = "none",
    indices: torch.Tensor | None = None,
    with_index: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Normalised (x, y) batches on ``device``; the shuffle order depends only on ``seed``.

    With ``with_index`` each batch is (x, y, idx), idx being the rows of ``split`` (on the CPU),
    so per-image values computed once (e.g. cached teacher logits) can be looked up.
    """
    generator = torch.Generator().manual_seed(seed)
    order = indices if indices is not None else torch.arange(len(split))
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    non_blocking = device.type == "cuda"
    for x, idx in _pixels(bundle, split, order, batch_size):
        y = split.y[idx]
        if augment != "none":
            x = _augment(x, augment, generator)
        if non_blocking:  # page-locked: the host-to-GPU copy runs asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(device, non_blocking=non_blocking)
        if with_index:
            yield bundle.normalize(x), y.to(device, non_blocking=non_blocking), idx
        else:
            yield bundle.normalize(x), y.to(device, non_blocking=non_blocking)


def _pixels(
    bundle: DataBundle, split: Split, order: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches of ``split`` in ``order`` with the rows they hold."""
    if not isinstance(split.x, DiskImages):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield split.x[idx], idx
        return
    images = split.x
    blank = images.shape[1:]
    stream = decoded_batches(
        images.paths, images.image_shape, blank, order.tolist(), batch_size, bundle.workers
    )
    for x, idx, problems in stream:
        if problems:
            more = f" (and {len(problems) - 1} more in this batch)" if len(problems) > 1 else ""
            raise DataError(f"{problems[0]}{more}")
        yield x, idx


def _augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Per-image random translation (pad 2 for 'shift', pad 4 + h-flip for 'crop_flip')."""
    pad = 2 if kind == "shift" else 4
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if kind == "crop_flip":
        flip = torch.rand(b, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def calibration_images(bundle: DataBundle, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` normalised training images (never validation or test) for int8 calibration."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(bundle.train), generator=generator)[:count]
    return bundle.normalize(bundle.train.x[idx])
