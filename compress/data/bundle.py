"""What every stage gets from the data: seeded splits of uint8 images and how to normalise them.

Images stay uint8 (N, C, H, W) until a batch is used, so a whole small dataset fits in memory
and the data never dominates an epoch on a CPU; larger image folders hold ``DiskImages``
(decoded on demand) instead of a tensor. The test split is handed out only through
``DataBundle.test``, which counts its readers: the tune stage proves with it that tuning never
looks at test data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from compress.data.images import DiskImages

Pixels = torch.Tensor | DiskImages


def take(x: Pixels, index: torch.Tensor | slice) -> Pixels:
    """Rows of ``x``: a tensor view for in-memory images, a lazy subset for images on disk."""
    return x.subset(index) if isinstance(x, DiskImages) else x[index]


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) (a tensor, or ``DiskImages``) and labels as int64 (N,)."""

    x: Pixels
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int | None) -> Split:
        return self if n is None else self.rows(slice(0, n))

    def rows(self, index: torch.Tensor | slice) -> Split:
        return Split(take(self.x, index), self.y[index])


@dataclass
class DataBundle:
    dataset: str
    train: Split
    val: Split
    _test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    test_reads: int = field(default=0)
    # how raw images become the model's pixels, e.g. {"resize": 32, "color": "RGB"} (none: as stored)
    resize: dict[str, Any] = field(default_factory=dict)
    workers: int = 0  # DataLoader workers for images that stream from disk
    fingerprint: str = ""  # of the files the images were read from (see data.fingerprint)

    @property
    def test(self) -> Split:
        self.test_reads += 1
        return self._test

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def model_fields(self) -> dict[str, int]:
        """What a model builder needs to know about the data to build its input and output layers."""
        c, h, _ = self.input_shape
        return {"in_channels": c, "image_size": h, "num_classes": self.num_classes}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the float input the model was trained on."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def preprocessing(self) -> dict[str, object]:
        """The recipe an edge team must apply to raw pixels, recorded with every export."""
        recipe: dict[str, object] = {
            "input_dtype": "float32",
            "layout": "NCHW",
            "scale": 1 / 255,
            "mean": list(self.mean),
            "std": list(self.std),
            "formula": "x = (pixels_uint8 / 255 - mean[c]) / std[c]",
        }
        return {**recipe, **self.resize} if self.resize else recipe
