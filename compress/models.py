"""The model zoo, and saving/loading models without unpickling code.

A model file holds a plain dict: the architecture spec (arch name and its arguments) and a
state dict. Loading rebuilds the architecture from this registry and then resizes any layer
whose saved weights have another shape, so structurally pruned models reload with
``torch.load(weights_only=True)`` and nothing else.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.config import import_factory
from compress.errors import ArtifactError
from compress.fileio import atomic_path

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


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate a zoo model; ``spec`` holds arch, width, ... plus the data's shape.

    ``arch: custom`` calls the ``import_path`` factory, but only one that a pipeline validated
    in this process names (``model.import_path``, trusted code): a model file cannot make us
    import anything on its own.
    """
    arch = spec.get("arch")
    if arch == "custom":
        return _build_custom(spec)
    if arch not in ZOO:
        raise ArtifactError(f"unknown model architecture {arch!r}; known: {', '.join(ZOO)}")
    try:
        return ZOO[arch](spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"model spec for {arch!r} is incomplete or invalid ({type(exc).__name__}: {exc})"
        ) from None


def _build_custom(spec: ModelSpec) -> nn.Module:
    path = spec.get("import_path")
    try:
        factory = import_factory(str(path))
    except PermissionError:
        raise ArtifactError(
            f"the model needs code from {path!r}, which no pipeline run here names in model.import_path; "
            "refusing to import it (name it in the pipeline's model.import_path if you trust that code)"
        ) from None
    except ValueError as exc:
        raise ArtifactError(f"model.import_path: {exc}") from None
    model = factory(dict(spec))
    if not isinstance(model, nn.Module):
        raise ArtifactError(
            f"model.import_path: {path} returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, spec: ModelSpec, path: Path, extra: dict | None = None) -> None:
    """Write spec + state dict atomically; the file reloads with weights_only=True."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": "compress.model/1", "spec": spec, "state": state, **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model saved by ``save_model``; corrupt or foreign files raise ArtifactError."""
    payload = load_checkpoint(path, map_location)
    if not is_model_payload(payload):
        raise ArtifactError(f"{path}: not a compress model file (no 'spec'/'state' inside)")
    spec = payload["spec"]
    try:
        model = build_model(spec)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    try:
        apply_state(model, payload["state"])
    except ValueError as exc:
        raise ArtifactError(f"{path}: weights do not fit {spec.get('arch')}: {exc}") from None
    return model, spec


def is_model_payload(payload: dict[str, Any]) -> bool:
    """True for what ``save_model`` writes: format tag, spec and a state dict of tensors."""
    state = payload.get("state")
    return (
        payload.get("format") == "compress.model/1"
        and isinstance(payload.get("spec"), dict)
        and isinstance(state, dict)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    )


def apply_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``, first resizing layers to the saved shapes (a channel-pruned
    model's narrower layers); ValueError with torch's reason when the weights do not fit."""
    try:
        _resize_to(model, state)
        model.load_state_dict(state)
    except (RuntimeError, IndexError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load restricted to tensors and plain containers, with a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": our message says it all
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        if "Weights only load failed" in str(exc):
            # torch's own text suggests weights_only=False: never give that advice for a file we refuse
            reason = "it holds Python objects other than tensors and plain containers, which could run code"
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
        raise ArtifactError(
            f"{path}: not a readable checkpoint ({reason}); it must be a file written by compress — "
            "if it is one of ours, delete it and re-run the stage"
        ) from None
    if not isinstance(payload, dict):
        raise ArtifactError(f"{path}: expected a dict checkpoint, found {type(payload).__name__}")
    return payload


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each Linear/Conv2d/BatchNorm2d the shape its saved weights have.

    Channel pruning changes layer widths; rebuilding those layers from tensor shapes is what
    lets a pruned model reload from a plain state dict instead of a pickled module.
    """
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None or getattr(module, "weight", None) is None:
            continue
        if tuple(module.weight.shape) == tuple(weight.shape):
            continue
        has_bias = f"{name}.bias" in state
        if isinstance(module, nn.Linear):
            new: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        elif isinstance(module, nn.Conv2d):
            new = nn.Conv2d(
                weight.shape[1] * module.groups,
                weight.shape[0],
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                bias=has_bias,
            )
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(weight.shape[0], module.eps, module.momentum, module.affine)
        else:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
