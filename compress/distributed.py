"""Several processes, one pipeline: DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node N -m compress.run PIPELINE.yaml`` starts N copies of the CLI with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment. ``session()`` (opened by ``run.py``) joins them into a process group from
``env://``: gloo on a machine without CUDA, ``cpu:gloo,cuda:nccl`` where CUDA exists (NCCL
all-reduces DDP's gradients on the GPUs; gloo carries CPU tensors and pickled objects).
Without torchrun, or with one process, nothing here is initialised and every helper below
answers as a single process would (rank 0 of 1), so the single-process path is unchanged.

How a run divides the work (see ``engine.stage_run.run_on_ranks``):

- Every rank walks the pipeline. Rank 0 alone decides, under the cache lock, whether a stage
  is a cache hit and broadcasts the decision; the others follow it.
- Stages registered with ``distributed=True`` (train, prune, distill) run on every rank:
  ``training.fit`` wraps the model in DDP, each rank trains on its shard of the epoch (the
  ``DistributedSampler`` split of the single-process shuffle, re-drawn every epoch) and
  ``measure.evaluate`` counts its share of the images, the counts summed across ranks.
  Rank 0 writes into the stage's cache directory; the others write into a scratch copy
  that is deleted afterwards, then read what rank 0 committed.
- Every other stage (quantize, export, benchmark, gates, report, tune) runs on rank 0 only,
  inside ``solo()``; the other ranks wait for it on a gloo group whose timeout is long
  enough for a tune stage, then read its cached result.
- Only rank 0 writes the run directory, the manifest, the logs and ``reports/``.

Metrics are exact: evaluation splits the images among the ranks without padding, so every
test image is counted exactly once overall and the accuracy equals the single-process one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from compress.errors import CompressError, ConfigError

T = TypeVar("T")

# How long ranks 1..N-1 wait for rank 0 to finish a stage it runs alone (a tune stage may take
# hours). Training collectives keep torch's default timeout on the default group.
CONTROL_TIMEOUT = timedelta(days=7)
EXIT_STAGE_FAILED = 3
EXIT_INTERRUPTED = 130


class _State:
    control: Any = None  # the gloo group for decisions and barriers
    backend: str | None = None
    solo: int = 0  # > 0 while rank 0 runs something alone: collectives are off


_state = _State()


class PeerFailed(CompressError):
    """Another rank failed; it printed the reason. Carries that rank's exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_STAGE_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------ who am I


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """True when training and evaluation must run as collectives across the ranks."""
    return initialized() and world_size() > 1 and _state.solo == 0


def describe() -> dict[str, Any]:
    """What the manifest records about the process layout."""
    world = world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return {
        "world_size": world,
        "backend": _state.backend,
        "local_world_size": local,
        "nodes": int(os.environ.get("GROUP_WORLD_SIZE", str(max(1, world // max(local, 1))))),
        "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else None,
    }


# ------------------------------------------------------------------ set-up and tear-down


@contextmanager
def session(enabled: bool = True) -> Iterator[bool]:
    """Join the process group torchrun described in the environment; leave it on exit.

    Does nothing (yields False) without torchrun, with WORLD_SIZE 1, or when ``enabled`` is
    False (``--validate``, and ``--worker`` processes, which share a study, not a model).
    """
    if not enabled or launched_world_size() <= 1 or initialized():
        yield False
        return
    has_cuda = torch.cuda.is_available() and dist.is_nccl_available()
    backend = "cpu:gloo,cuda:nccl" if has_cuda else "gloo"
    if has_cuda and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://")
    _state.backend = backend
    _state.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    try:
        yield True
    finally:
        _state.control, _state.backend, _state.solo = None, None, 0
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun: one GPU per process on each node."""
    if device.type != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    index, count = local_rank(), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"local rank {index} has no GPU of its own (this node has {count}); start at most "
            f"{count} processes per node (--nproc_per_node {count}) or use --device cpu"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextmanager
def solo() -> Iterator[None]:
    """Rank 0 running a stage alone: ``fit``/``evaluate`` must not wait for the others."""
    _state.solo += 1
    try:
        yield
    finally:
        _state.solo -= 1


# ------------------------------------------------------------------ collectives


def barrier() -> None:
    if initialized():
        dist.barrier(group=_state.control)


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (a pickled object on the gloo control group)."""
    if not initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_state.control)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over the ranks (a CPU copy; the input is not modified)."""
    total = tensor.detach().cpu().clone()
    if active():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values in ``tensors``, in place, on every rank (e.g. re-estimated statistics, which
    every rank computes alike on a CPU but a GPU's kernels need not reproduce bit for bit)."""
    if active():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its value, or raises if it failed."""
    if not initialized():
        return fn()
    payload: tuple[str, Any, int] | None = None
    if is_main():
        try:
            payload = ("ok", fn(), 0)
        except BaseException as exc:
            broadcast_object(("error", f"rank 0: {type(exc).__name__}: {exc}", _exit_code(exc)))
            raise
    status, value, code = broadcast_object(payload)
    if status == "error":
        raise PeerFailed(value, code)
    return value


def check_peers(error: BaseException | None) -> None:
    """Every rank says how its part went; all raise if one failed (the failed one re-raises
    its own error after this call)."""
    if not initialized():
        return
    mine = None if error is None else (f"rank {rank()}: {type(error).__name__}: {error}", _exit_code(error))
    outcomes: list[Any] = [None] * world_size()
    dist.all_gather_object(outcomes, mine, group=_state.control)
    failed = [o for o in outcomes if o is not None]
    if failed and error is None:
        raise PeerFailed("; ".join(m for m, _ in failed), failed[0][1])


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return getattr(exc, "exit_code", EXIT_STAGE_FAILED)


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 does the body first (e.g. downloads or unpacks data), then the others."""
    if not initialized() or _state.solo:
        yield
        return
    if is_main():
        yield
        barrier()
    else:
        barrier()
        yield


# ------------------------------------------------------------------ data and model


def epoch_shard(
    n: int, seed: int, epoch: int, rank_: int | None = None, world: int | None = None
) -> torch.Tensor:
    """This rank's indices of an ``n``-item epoch, in order: the shuffle is
    ``randperm(n)`` seeded with ``seed + epoch`` (as ``DistributedSampler.set_epoch`` does),
    padded by repeating its head to a multiple of the world size, then dealt out
    round-robin. With ``world`` 1 it is exactly the single-process shuffle."""
    sampler = DistributedSampler(
        range(n),
        num_replicas=world if world is not None else world_size(),
        rank=rank_ if rank_ is not None else rank(),
        shuffle=True,
        seed=seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def eval_shard(n: int, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """Every ``world``-th item from ``rank``: the shards partition range(n), no padding."""
    r = rank_ if rank_ is not None else rank()
    w = world if world is not None else world_size()
    return torch.arange(n)[r::w]  # empty for a rank past the end of a tiny split


def per_rank_batch(batch_size: int, what: str) -> int:
    """``batch_size`` is the global batch; each of the ranks takes an equal part of it."""
    world = world_size()
    if batch_size % world:
        raise ConfigError(
            f"{what}: {batch_size} is the global batch, split evenly across the {world} "
            f"processes; make it a multiple of {world}"
        )
    return batch_size // world


def rank_seed(seed: int) -> int:
    """A distinct seed per rank (for augmentation and dropout); rank 0 keeps ``seed``."""
    return seed + 104_729 * rank()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel; its parameters are rank 0's from here on."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)


# ------------------------------------------------------------------ scratch directories


def scratch_copy(partial: Path) -> Path:
    """A non-zero rank's own work directory beside rank 0's (``<entry>.rank<N>``): a fresh copy
    of rank 0's, so a resumed stage finds the same checkpoints on every rank. Removed with
    ``discard``; one left by a killed run is replaced by the next."""
    scratch = partial.with_name(f"{partial.name}.rank{rank()}")
    shutil.rmtree(scratch, ignore_errors=True)
    if partial.is_dir():
        shutil.copytree(partial, scratch)
    else:
        scratch.mkdir(parents=True)
    return scratch


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
