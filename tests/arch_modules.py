"""Hand-written models for ``tests/test_architectures.py``, built through ``model.import_path``.

Each one has a structure the torchvision and timm builders lack or hide: a channel
concatenation a user wrote, GroupNorm with a fixed group count, and a LayerNorm + Linear
classifier held in an attribute named ``head``.
"""

from __future__ import annotations

import torch
from torch import nn


class ConcatBlock(nn.Module):
    """Two branches joined along channels, as a user writes a DenseNet/Inception block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(channels, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(channels, 20, 1), nn.BatchNorm2d(20), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), self.right(x), x], dim=1)


def concat_net(spec: dict) -> nn.Module:
    """Stem, two concatenating blocks, a pointwise mix, global pool and a Linear classifier."""
    channels = int(spec["in_channels"])
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        ConcatBlock(16),
        nn.MaxPool2d(2),
        ConcatBlock(48),
        nn.Conv2d(80, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, int(spec["num_classes"])),
    )


class GroupNormBlock(nn.Module):
    """A residual block normalised by GroupNorm(4, C): any width it is pruned to must divide by 4."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=3, bias=False)
        self.norm2 = nn.GroupNorm(4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(y)))


def group_norm_net(spec: dict) -> nn.Module:
    """GroupNorm(4, C) after every convolution and a convolution of 3 groups in each block: the
    widths they share must stay multiples of 12."""
    return nn.Sequential(
        nn.Conv2d(int(spec["in_channels"]), 24, 3, padding=1, bias=False),
        nn.GroupNorm(4, 24),
        nn.ReLU(),
        GroupNormBlock(24),
        nn.Conv2d(24, 36, 3, stride=2, padding=1, bias=False),
        nn.GroupNorm(4, 36),
        nn.ReLU(),
        GroupNormBlock(36),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(36, int(spec["num_classes"])),
    )


class NormHeadNet(nn.Module):
    """Convolutions, then a classifier attribute ``head``: LayerNorm and Linear (as ConvNeXt/ViT)."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 24, 3, padding=1),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1),
            nn.BatchNorm2d(48),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.LayerNorm(48), nn.Linear(48, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def norm_head_net(spec: dict) -> nn.Module:
    return NormHeadNet(int(spec["in_channels"]), int(spec["num_classes"]))
