"""``fit``'s epoch checkpoint: what a killed training needs to resume where it stopped.

One file per work directory, rewritten atomically after every epoch (Ctrl-C waits for it), so a
resumed fit never reads a half-written file and loses at most one epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from compress import distributed
from compress.fileio import atomic_path, no_interrupt
from compress.models import load_checkpoint

log = logging.getLogger("compress.training")


def resume(path: Path, trained: dict[str, Any], device: torch.device, desc: str) -> tuple[int, list[dict]]:
    """Load the checkpoint into ``trained`` (model, optimizer, scheduler, features: anything with
    ``load_state_dict``); (the epoch to start from, the history so far), (0, []) without one.
    Under torchrun every rank takes rank 0's checkpoint (other nodes may not see its disk)."""
    if distributed.active():
        state = distributed.on_main(
            lambda: load_checkpoint(path, map_location="cpu") if path.exists() else None
        )
    else:
        state = load_checkpoint(path, map_location=device) if path.exists() else None
    if state is None:
        return 0, []
    for key, part in trained.items():
        if key in state:
            part.load_state_dict(state[key])
    epoch = int(state["epoch"])
    log.info("%s: resuming from %s after epoch %d", desc, path, epoch)
    return epoch, list(state["history"])


def save(path: Path, trained: dict[str, Any], history: list[dict], epoch: int) -> None:
    """Everything a resumed fit needs, written atomically."""
    state = {key: part.state_dict() for key, part in trained.items()}
    with no_interrupt(), atomic_path(path) as tmp:
        torch.save({**state, "history": history, "epoch": epoch}, tmp)
