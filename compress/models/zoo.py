"""The small model zoo: the classic architectures compression papers use on MNIST and CIFAR.

Each builder takes the model spec (arch, width, ... plus the data's shape) and returns a
randomly initialised ``nn.Module``; the classifier layer is always named ``classifier``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ModelSpec = dict[str, Any]


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class LeNet300(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998), the MLP used by Han et al. 2015."""

    def __init__(self, in_features: int, num_classes: int, width: float = 1.0, dropout=0.0):
        super().__init__()
        h1, h2 = _scaled(300, width), _scaled(100, width)
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, h1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A plain MLP with the given hidden sizes, e.g. a 2x800 or 784-80-10 student."""

    def __init__(self, in_features: int, num_classes: int, hidden: list[int], dropout=0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_features
        for size in hidden:
            layers += [nn.Linear(previous, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            previous = size
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (20-50-500), the one Han et al. 2015 prune; ~431k parameters."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: float = 1.0, dropout=0.0):
        super().__init__()
        c1, c2, f1 = _scaled(20, width), _scaled(50, width), _scaled(500, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.head = nn.Sequential(nn.Linear(c2 * side * side, f1), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.classifier = nn.Linear(f1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (3 stages x 3 blocks, 16-32-64 channels, projection shortcuts)."""

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0, dropout=0.0):
        super().__init__()
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        previous = widths[0]
        for stage, planes in enumerate(widths):
            for block in range(3):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(previous, planes, stride))
                previous = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.layers(self.stem(x))))


def _lenet300(s: ModelSpec) -> nn.Module:
    return LeNet300(_in_features(s), s["num_classes"], s.get("width", 1.0), s.get("dropout", 0.0))


def _mlp(s: ModelSpec) -> nn.Module:
    hidden = s.get("hidden") or [_scaled(800, s.get("width", 1.0))] * 2
    return MLP(_in_features(s), s["num_classes"], hidden, s.get("dropout", 0.0))


def _lenet5(s: ModelSpec) -> nn.Module:
    return LeNet5(
        s["in_channels"],
        s["image_size"],
        s["num_classes"],
        s.get("width", 1.0),
        s.get("dropout", 0.0),
    )


def _resnet20(s: ModelSpec) -> nn.Module:
    return ResNet20(s["in_channels"], s["num_classes"], s.get("width", 1.0), s.get("dropout", 0.0))


def _in_features(s: ModelSpec) -> int:
    return s["in_channels"] * s["image_size"] * s["image_size"]


ZOO: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "lenet300": _lenet300,
    "lenet5": _lenet5,
    "resnet20": _resnet20,
    "mlp": _mlp,
}
