"""Weights a user brings: their own trained state dict, or pretrained weights from a local file.

Users save weights the way the PyTorch tutorials do (``torch.save(model.state_dict(), p)``)
or as a checkpoint dict (``{"model_state_dict": ..., "optimizer_state_dict": ...}``); a model
trained under DataParallel/DDP has every key prefixed ``module.``. All of these load with
``weights_only=True`` only. When weights do not fit, the message lists the first few missing
and unexpected keys and the shapes that differ, not torch's wall of text.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import ArtifactError

STATE_KEYS = ("model_state_dict", "state_dict", "model", "net", "weights")
LISTED = 5
ENUM_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # torchvision weight names: DEFAULT, IMAGENET1K_V1, ...


def is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def state_dict_in(payload: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str] | None:
    """The state dict a plain checkpoint holds, and where it was found; None if there is none."""
    if is_state_dict(payload):
        return strip_prefix(payload), "a state dict"
    for key in STATE_KEYS:
        if is_state_dict(payload.get(key)):
            return strip_prefix(payload[key]), f"the checkpoint's {key!r}"
    return None


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Keys saved from a DataParallel/DDP-wrapped model start with ``module.``; drop it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """None if ``state`` fits ``model`` exactly, else what differs (first few of each kind)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs the model's {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shapes differ", shapes),
    ):
        if items:
            more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:LISTED])}{more}")
    return "; ".join(parts) or None


def load_exact(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a user's state dict that must fit exactly; ValueError naming what does not."""
    problem = mismatch(model, state)
    if problem is not None:
        raise ValueError(problem)
    model.load_state_dict(state)


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], keep_out: set[str]) -> list[str]:
    """Load pretrained weights into a model built for this data: layers whose shape differs
    only because of the data (``keep_out``: the classifier, the stem's input channels) keep
    their fresh initialisation (the stem is adapted by the caller); anything else that does not
    fit is a ValueError. Returns the keys not loaded."""
    own = model.state_dict()
    skipped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    unexplained = [k for k in skipped if k.rsplit(".", 1)[0] not in keep_out]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if unexplained or missing:
        detail = mismatch(model, {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in keep_out})
        raise ValueError(f"the pretrained weights are for another architecture: {detail}")
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in skipped}, strict=False)
    return skipped


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Pretrained RGB kernels for ``channels`` inputs: summed for grayscale (the response to a
    gray image is unchanged), otherwise repeated and rescaled (timm's rule)."""
    if weight.shape[1] == channels:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (weight.shape[1] / channels)


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
            f"{path}: not a readable checkpoint ({reason}); it must be a file of tensors: a state dict, "
            "a checkpoint dict holding one, or a model.pt written by compress"
        ) from None
    if not isinstance(payload, dict):
        raise ArtifactError(f"{path}: expected a dict checkpoint, found {type(payload).__name__}")
    return payload
