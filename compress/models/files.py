"""Model files: saving and loading models without unpickling code.

A model file holds a plain dict: the architecture spec (how ``build_model`` rebuilds it), a
state dict, and the group count of every grouped convolution. Loading rebuilds the
architecture and then resizes each layer whose saved weights have another shape, so a
channel-pruned model (narrower convolutions, depthwise ones included) reloads with
``torch.load(weights_only=True)`` and nothing else.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import ArtifactError
from compress.fileio import atomic_path
from compress.models.anatomy import replace_module
from compress.models.builders import build_model
from compress.models.weights import load_checkpoint
from compress.models.zoo import ModelSpec

FORMAT = "compress.model/1"


def conv_groups(model: nn.Module) -> dict[str, int]:
    """The group count of every grouped (incl. depthwise) convolution, by layer name."""
    return {n: int(m.groups) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups != 1}


def save_model(model: nn.Module, spec: ModelSpec, path: Path, extra: dict | None = None) -> None:
    """Write spec + state dict atomically; the file reloads with weights_only=True."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "spec": spec, "state": state, "groups": conv_groups(model), **(extra or {})}
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
        apply_state(model, payload["state"], payload.get("groups"))
    except ValueError as exc:
        raise ArtifactError(f"{path}: weights do not fit {spec.get('arch')}: {exc}") from None
    return model, spec


def is_model_payload(payload: dict[str, Any]) -> bool:
    """True for what ``save_model`` writes: format tag, spec and a state dict of tensors."""
    state = payload.get("state")
    return (
        payload.get("format") == FORMAT
        and isinstance(payload.get("spec"), dict)
        and isinstance(state, dict)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    )


def apply_state(
    model: nn.Module, state: dict[str, torch.Tensor], groups: dict[str, int] | None = None
) -> None:
    """Load ``state`` into ``model``, first resizing layers to the saved shapes (a channel-pruned
    model's narrower layers); ValueError with torch's reason when the weights do not fit."""
    try:
        _resize_to(model, state, groups or {})
        model.load_state_dict(state)
    except (RuntimeError, IndexError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor], groups: dict[str, int]) -> None:
    """Give each Linear/Conv2d/norm layer the shape its saved weights have.

    Channel pruning changes layer widths; rebuilding those layers from tensor shapes is what
    lets a pruned model reload from a plain state dict instead of a pickled module. Each layer
    is a resized copy of itself, so subclasses keep their own forward (timm's BatchNormAct2d,
    torchvision's LayerNorm2d). A convolution's group count comes from the file; without it
    (older files) a depthwise convolution (groups == channels) stays depthwise at its new width
    and others keep theirs.
    """
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None or not isinstance(module, RESIZABLE) or getattr(module, "weight", None) is None:
            continue
        count = None
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            count = groups.get(name, weight.shape[0] if depthwise else module.groups)
        if tuple(module.weight.shape) == tuple(weight.shape) and (count is None or count == module.groups):
            continue
        replace_module(model, name, _resized(module, name, state, weight, count))


RESIZABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def _resized(
    module: nn.Module, name: str, state: dict[str, torch.Tensor], weight: torch.Tensor, groups: int | None
) -> nn.Module:
    """A copy of ``module`` with the saved tensors' shapes (values are loaded afterwards)."""
    new = copy.deepcopy(module)
    for attr, _ in list(module.named_parameters(recurse=False)):
        saved = state.get(f"{name}.{attr}")
        if saved is not None:
            setattr(new, attr, nn.Parameter(torch.empty_like(saved)))
    for attr, buffer in list(module.named_buffers(recurse=False)):
        saved = state.get(f"{name}.{attr}")
        if saved is not None and buffer is not None:
            new._buffers[attr] = torch.empty_like(saved)
    if isinstance(new, nn.Conv2d):
        new.out_channels, new.groups = weight.shape[0], groups or 1
        new.in_channels = weight.shape[1] * new.groups
    elif isinstance(new, nn.Linear):
        new.out_features, new.in_features = weight.shape
    elif isinstance(new, nn.BatchNorm2d):
        new.num_features = weight.shape[0]
    elif isinstance(new, nn.LayerNorm):
        new.normalized_shape = tuple(weight.shape)
    elif isinstance(new, nn.GroupNorm):
        new.num_channels = weight.shape[0]
    return new
