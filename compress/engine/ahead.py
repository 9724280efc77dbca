"""Stages that do not depend on each other, run side by side: a second process works ahead.

Small models do not fill two cores (the default MNIST run used 131 % CPU on two), so while the
engine runs a stage, a forked child runs the later stages whose inputs already exist (the
pruned, distilled and searched variants of one baseline need only the baseline), each on one
thread while the parent also runs on one. The child goes through the same cache as the parent:
it commits each stage it finishes, and when the parent reaches that stage it finds the result
(or waits on the stage's lock while the child is still at it, or runs the stage itself if the
child has not started it; the cache's lock makes both take the same entry once). Nothing else
is shared: a stage computes the same thing in either process (on one thread, float sums may
differ in their last bits from a two-thread run, as between machines).

Only stages that read nothing but their input variants and the data go ahead (``StageDef.
concurrent``); not under torchrun, on a GPU (a forked child cannot use the parent's CUDA
context), with ``--only``/``--from``/``--force``/``--worker``, with one core, or with
``COMPRESS_JOBS=1``. Forking after torch has run is safe on one thread (PyTorch's DataLoader
workers do the same); the child dies with the parent (``PR_SET_PDEATHSIG``) and draws no
progress bars (they would garble the parent's). ``COMPRESS_FAULT`` (the test hook of
``compress.faults``) also turns it off: a test that stops a run at a point expects the stages
after it not to have run.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from compress import distributed
from compress.config import StageConfig
from compress.engine import cache
from compress.engine.records import RunOptions
from compress.errors import ArtifactError
from compress.fileio import write_json
from compress.stages import StageDef

log = logging.getLogger("compress")
_PR_SET_PDEATHSIG = 1


def enabled(options: RunOptions, device: torch.device) -> bool:
    """Whether this run may work ahead (see the module's docstring)."""
    if os.environ.get("COMPRESS_JOBS") == "1" or os.environ.get("COMPRESS_FAULT"):
        return False
    if options.only_stage or options.from_stage or options.force or options.worker:
        return False
    if distributed.initialized() or device.type != "cpu":
        return False
    return (os.cpu_count() or 1) >= 2 and hasattr(os, "fork")


@dataclass
class Ahead:
    """The child working ahead (at most one at a time) and what it has finished."""

    stages: list[StageConfig]
    registry: dict[str, StageDef]
    base: Path  # artifacts/<pipeline>: the cache both processes share
    run_dir: Path
    on: bool
    pid: int | None = None
    threads: int = field(default_factory=torch.get_num_threads)

    def launch(
        self,
        position: int,
        available: list[str],
        run_one: Callable[..., str],
        cached: Callable[[StageConfig], bool],
    ) -> None:
        """Before stage ``position`` runs: if no child is at work, fork one for the later stages
        that are ready with ``available`` (and what the child itself makes on the way), unless
        all of them are already in the cache."""
        if not self.on or self._busy():
            return
        plan = self._plan(position, available)
        if all(cached(cfg) for cfg in plan if set(cfg.consumes(list(available))) <= set(available)):
            return  # nothing to do, or all of it reused from the cache
        try:
            pid = os.fork()
        except OSError as exc:  # no memory or process slots left: run in order, as with one core
            log.info("not working ahead: cannot start a second process (%s)", exc)
            self.on = False
            return
        if pid == 0:  # the child: run the plan, then leave without running the parent's cleanup
            code = 1
            try:
                _become_child()
                for cfg in plan:  # one the parent is at, or whose input it is making, is left to it
                    self._run_marked(cfg, run_one)
                code = 0
            except BaseException:  # the parent runs the stage itself and reports its error
                log.debug("work ahead stopped", exc_info=True)
            finally:
                os._exit(code)
        self.pid = pid
        torch.set_num_threads(1)
        log.info("working ahead in a second process: %s", ", ".join(c.label for c in plan))

    def _run_marked(self, cfg: StageConfig, run_one: Callable[..., str]) -> None:
        """Run one stage of the plan here and mark it done; skip it when the parent holds it (or
        what it reads is still being made there): waiting for the parent would only keep this
        process from leaving, and a new one from starting on what is ready by then."""
        try:
            status = run_one(cfg, False)
        except (cache.Busy, ArtifactError):
            return
        if status == "ran":  # its time is in the cache entry ("made"), where the parent reads it
            write_json(self._done(cfg.label), {"status": status})

    def holds(self, cfg: StageConfig, key: str) -> bool:
        """Whether the process working ahead is at stage ``cfg`` now (it holds its entry's lock)."""
        if not self._busy():
            return False
        entry, _ = cache.entry_paths(self.base, cfg.label, key)
        lock = FileLock(str(cache.lock_file(self.base / "cache", entry.name)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def ready_after(self, position: int, available: list[str], taken: set[int]) -> list[int]:
        """Later stages that could run now on ``available`` (not ``taken``), in order."""
        return [
            self.stages.index(cfg)
            for cfg in self._plan(position, available, follow=False)
            if self.stages.index(cfg) not in taken
        ]

    def finish(self) -> None:
        """Stop a child still at work (the run ended or failed) and restore the thread count."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = None
        torch.set_num_threads(self.threads)

    def _busy(self) -> bool:
        if self.pid is None:
            return False
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            done = self.pid
        if done == 0:
            return True
        self.pid = None
        torch.set_num_threads(self.threads)  # the parent has the cores to itself again
        return False

    def _plan(self, position: int, available: list[str], follow: bool = True) -> list[StageConfig]:
        """Later stages whose inputs exist now (or, with ``follow``, are made earlier in the
        plan), in order."""
        tuned = {getattr(s, "target", None) for s in self.stages if s.stage == "tune"}
        have = list(available)
        made_by_then: list[str] = list(available)
        plan = []
        for i, cfg in enumerate(self.stages):
            try:
                inputs = cfg.consumes(list(made_by_then))
            except ValueError:
                return plan
            outputs = cfg.produces(inputs)
            if i > position and self.registry[cfg.stage].concurrent and cfg.label not in tuned:
                if all(name in have for name in inputs) and not self._done(cfg.label).is_file():
                    plan.append(cfg)
                    have += outputs if follow else []
            made_by_then += [o for o in outputs if o not in made_by_then]
        return plan

    def _done(self, label: str) -> Path:
        return self.run_dir / "ahead" / f"{label}.json"


def _become_child() -> None:
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux: the parent's finish() still stops it
        pass
    torch.set_num_threads(1)
    import tqdm

    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)  # type: ignore[method-assign]
