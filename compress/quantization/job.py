"""One parent variant quantized in every mode the stage asks for: what its modes share.

The stage's config reaches this package as the ``QuantizeSpec`` protocol, so the mechanics never
import the stages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compress.batchnorm import adapt_batchnorm
from compress.context import Context
from compress.data import DataBundle, Split
from compress.quantization import ort
from compress.variants import Variant


class QuantizeSpec(Protocol):
    """What the quantize stage's config offers the backends (``stages.quantize.QuantizeConfig``)."""

    backend: str
    modes: list[str]
    tolerance: float | None
    prefer: str
    effective_reduce_range: bool  # reduce_range resolved for this machine
    sensitivity: bool
    calibration: Any
    latency: Any
    bn_adapt_batches: int  # BatchNorm adaptation before static calibration and QAT (0: off)
    qat: Any  # QatConfig: a TrainingConfig plus distill, weight_bits and the freezing points

    @property
    def label(self) -> str: ...  # the stage's name, recorded on every variant it makes

    def output_name(self, parent: str, mode: str) -> str: ...

    def ort_settings(self) -> ort.OrtSettings: ...


@dataclass
class Job:
    """What every mode of one parent shares."""

    cfg: QuantizeSpec
    parent: Variant
    model: nn.Module
    bundle: DataBundle
    images: torch.Tensor
    sample: torch.Tensor  # the latency batch
    ctx: Context
    out_dir: Path
    batchnorm: dict[str, Any] | None = None  # the BatchNorm adaptation's record, once it ran
    _calibrated: nn.Module | None = field(default=None, repr=False)

    @property
    def has_val(self) -> bool:
        """Whether the data has a validation split: without one, nothing is searched or checked
        against the tolerance (the test split never decides)."""
        return len(self.bundle.val) > 0

    def work_dir(self, name: str) -> Path:
        """A variant's scratch directory (trial files, calibration cache), deleted with the stage's
        ``work`` directory when the stage ends."""
        work = self.out_dir / "work" / name
        work.mkdir(parents=True, exist_ok=True)
        return work

    def accuracies(self, accuracy: Callable[[Split], dict[str, Any]]) -> tuple[float | None, dict[str, Any]]:
        """(validation accuracy or None without that split, the test split's counts) of whatever
        ``accuracy(split)`` scores."""
        val = accuracy(self.bundle.val)["accuracy"] if self.has_val else None
        return val, self.test_accuracy(accuracy)

    def test_accuracy(self, accuracy: Callable[[Split], dict[str, Any]]) -> dict[str, Any]:
        """The test split's accuracy, or Nones inside a tuning trial, where that split is off limits."""
        if self.ctx.tuning:
            return {"accuracy": None, "correct": None, "count": None}
        return accuracy(self.bundle.test)

    def calibration_model(self) -> nn.Module:
        """The parent with its BatchNorm statistics re-estimated on training images, for the
        modes that calibrate or train (static, PTQ, QAT): a stale running average would become
        the int8 file's folded scales. In a PT2E graph BatchNorm is no longer a module, so the
        eager fp32 model is adapted before export. The parent itself stays untouched: it is the
        fp32 reference every variant is compared with. The parent when nothing changed (no
        BatchNorm, ``bn_adapt_batches: 0``, or its own statistics score higher on validation).
        """
        if self._calibrated is None:
            model = copy.deepcopy(self.model)
            self.batchnorm = adapt_batchnorm(
                model,
                self.bundle,
                self.ctx.device,
                self.cfg.bn_adapt_batches,
                self.ctx.seed,
                f"quantize {self.parent.name}",
                logger=self.ctx.log,
            )
            changed = self.batchnorm is not None and self.batchnorm["kept"]
            self._calibrated = model.cpu().eval() if changed else self.model
        return self._calibrated
