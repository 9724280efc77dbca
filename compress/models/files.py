"""Model files: saving and loading models without unpickling code.

A model file holds a plain dict: the architecture spec (how ``build_model`` rebuilds it), a
state dict, the state dict's version metadata and the group count of every grouped
convolution. Loading rebuilds the architecture and then gives every parameter and buffer
whose saved tensor has another shape that shape, so a channel-pruned model (narrower
convolutions, depthwise ones included, and any per-channel tensor: norms, layer scales,
squeeze-excitation) reloads with ``torch.load(weights_only=True)`` and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from compress.errors import ArtifactError
from compress.fileio import atomic_path
from compress.models.builders import build_model
from compress.models.weights import load_checkpoint
from compress.models.zoo import ModelSpec

FORMAT = "compress.model/1"
PLAIN = (int, float, str, bool)


def conv_groups(model: nn.Module) -> dict[str, int]:
    """The group count of every grouped (incl. depthwise) convolution, by layer name."""
    return {n: int(m.groups) for n, m in model.named_modules() if isinstance(m, _ConvNd) and m.groups != 1}


def state_metadata(state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The state dict's per-module metadata (``{'layers': {'version': 2}}``) as plain values.

    Some modules read their version from it while loading (torchvision's MNASNet refuses a
    state without one), and ``torch.load(weights_only=True)`` takes plain dicts of numbers.
    """
    found = getattr(state, "_metadata", None) or {}
    return {
        str(prefix): {str(k): v for k, v in entry.items() if isinstance(v, PLAIN)}
        for prefix, entry in found.items()
        if isinstance(entry, dict)
    }


def with_metadata(state: dict[str, torch.Tensor], metadata: Any) -> dict[str, torch.Tensor]:
    """``state`` carrying ``metadata`` as ``load_state_dict`` expects it; files written before
    the metadata was saved (None) load as they always did."""
    if not isinstance(metadata, dict):
        return state
    carried = OrderedDict(state)
    carried._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items() if isinstance(v, dict))  # type: ignore[attr-defined]
    return carried


def save_model(model: nn.Module, spec: ModelSpec, path: Path, extra: dict | None = None) -> None:
    """Write spec + state dict atomically; the file reloads with weights_only=True."""
    original = model.state_dict()
    state = {k: v.detach().cpu().clone() for k, v in original.items()}
    payload = {
        "format": FORMAT,
        "spec": spec,
        "state": state,
        "metadata": state_metadata(original),
        "groups": conv_groups(model),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def payload_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of a model file, with its metadata when the file has it."""
    return with_metadata(payload["state"], payload.get("metadata"))


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
        apply_state(model, payload_state(payload), payload.get("groups"))
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
    """Load ``state`` into ``model``, first resizing tensors to the saved shapes (a channel-pruned
    model's narrower layers); ValueError with torch's reason when the weights do not fit."""
    try:
        _resize_to(model, state, groups or {})
        model.load_state_dict(state)
    except (RuntimeError, IndexError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor], groups: dict[str, int]) -> None:
    """Give every parameter and buffer the shape its saved tensor has, then the size attributes
    of the standard layers (``in_channels``, ``num_features``, ...) the matching values.

    Channel pruning changes widths anywhere a channel flows: convolutions and norms, but also
    bare per-channel parameters (ConvNeXt's layer scale) that no layer type describes, so the
    rule is by tensor, not by layer type. Tensors are replaced in place, so every module keeps
    its own class and forward (timm's BatchNormAct2d, torchvision's LayerNorm2d). A
    convolution's group count comes from the file; without it (older files) a depthwise
    convolution (groups == channels) stays depthwise at its new width and others keep theirs.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        changed = False
        for attr, tensor in list(module._parameters.items()):
            saved = state.get(prefix + attr)
            if tensor is not None and saved is not None and saved.shape != tensor.shape:
                module._parameters[attr] = nn.Parameter(
                    torch.empty(saved.shape, dtype=tensor.dtype), requires_grad=tensor.requires_grad
                )
                changed = True
        for attr, tensor in list(module._buffers.items()):
            saved = state.get(prefix + attr)
            if tensor is not None and saved is not None and saved.shape != tensor.shape:
                module._buffers[attr] = torch.empty(saved.shape, dtype=tensor.dtype)
                changed = True
        if isinstance(module, _ConvNd):
            _conv_sizes(module, name, groups, changed)
        elif changed:
            _sizes(module)


def _conv_sizes(conv: _ConvNd, name: str, groups: dict[str, int], changed: bool) -> None:
    """A convolution's channel counts and group count from its (resized) weight."""
    weight = conv.weight
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if name in groups:
        count = groups[name]
    elif changed:
        count = weight.shape[1 if conv.transposed else 0] if depthwise else conv.groups
    else:
        return
    conv.groups = int(count)
    if conv.transposed:
        conv.in_channels, conv.out_channels = weight.shape[0], weight.shape[1] * conv.groups
    else:
        conv.out_channels, conv.in_channels = weight.shape[0], weight.shape[1] * conv.groups


def _sizes(module: nn.Module) -> None:
    """The size attributes of the standard non-convolution layers, from their resized tensors."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, _NormBase):  # BatchNorm*, InstanceNorm* (timm's BatchNormAct2d too)
        sized = weight if weight is not None else module.running_mean
        if sized is not None:
            module.num_features = sized.shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.PReLU) and weight is not None:
        module.num_parameters = weight.shape[0]
