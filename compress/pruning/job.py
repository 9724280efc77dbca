"""What the two pruning jobs share: the model and data they work on, the accuracies they record,
and how they report a setting the model cannot satisfy.

The stage's config reaches this package as the ``PruneSpec`` protocol, so the jobs never import
the stages; a ``PruneProblem`` names the YAML key, and the stage turns it into the one-line
config error that names the pipeline file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compress.batchnorm import adapt_batchnorm
from compress.context import Context
from compress.data import DataBundle
from compress.measure import evaluate
from compress.training import Distiller, FitResult, FitSettings, fit
from compress.variants import Variant


class PruneSpec(Protocol):
    """What the prune stage's config offers the jobs (``stages.prune.PruneConfig``)."""

    label: str
    output_name: str
    amount: float | None
    target_macs_reduction: float | None
    schedule: str
    steps: int
    ramp: float
    layer_types: list[str]
    max_layer_sparsity: float | None
    layer_sparsity_limits: dict[str, float]
    importance: str
    channel_scope: str
    max_layer_amount: float
    round_to: int | None
    finetune: Any  # TrainingConfig | None
    final_finetune: int
    sensitivity: bool
    bn_adapt_batches: int  # BatchNorm adaptation after a cut that is not fine-tuned (0: off)


class PruneProblem(ValueError):
    """A setting this model cannot satisfy; ``key`` is the stage's YAML key to fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class PruneJob:
    """One input variant to prune: its model and spec, the data, and the layers kept whole."""

    cfg: PruneSpec
    source: Variant
    model: nn.Module
    spec: dict
    bundle: DataBundle
    example: torch.Tensor  # one normalised training image, on the CPU, for tracing and MACs
    kept: list[str]  # layer names never pruned (the classifier, ``exclude``)
    teacher: Distiller | None
    ctx: Context
    out_dir: Path

    def finetune(
        self,
        model: nn.Module,
        settings: Any,
        workdir: Path,
        desc: str,
        after_step: Callable[[], None] | None = None,
    ) -> FitResult:
        """Fine-tune ``model`` in place with the stage's settings, teacher and progress callback."""
        ctx = self.ctx
        run = FitSettings(
            settings,
            ctx.device,
            ctx.seed,
            workdir,
            desc=desc,
            distill=self.teacher,
            after_step=after_step,
            on_epoch=ctx.on_epoch,
        )
        return fit(model, self.bundle, run)

    def variant(self, method: str, metrics: dict, info: dict) -> Variant:
        """The pruned variant: the model the job saved as ``model.pt``, with its metrics."""
        return Variant(
            name=self.cfg.output_name,
            format="torch",
            file=self.out_dir / "model.pt",
            stage=self.cfg.label,
            parent=self.source.name,
            metrics=metrics,
            info={"method": method, "spec": self.spec, **info},
        )


def adapt_unfinetuned(model: nn.Module, job: PruneJob) -> dict | None:
    """Re-estimate BatchNorm statistics of a model pruned without fine-tuning (``finetune: null``):
    zeroed weights and removed channels shift every later layer's inputs. A fine-tuned model gets
    this at the end of ``fit``. The stage's ``bn_adapt_batches``."""
    batches = job.cfg.bn_adapt_batches
    return adapt_batchnorm(
        model, job.bundle, job.ctx.device, batches, job.ctx.seed, job.cfg.label, logger=job.ctx.log
    )


def model_name(spec: dict) -> str:
    """The name the user gave the architecture, for messages."""
    return str(spec.get("torchvision") or spec.get("timm") or spec.get("import_path") or spec.get("arch"))


def accuracies(model: nn.Module, job: PruneJob) -> dict:
    """Test and validation accuracy; a tuning trial (``ctx.tuning``) is scored on validation only."""
    bundle, ctx = job.bundle, job.ctx
    test = None if ctx.tuning else evaluate(model, bundle, bundle.test, ctx.device)
    val = evaluate(model, bundle, bundle.val, ctx.device) if len(bundle.val) else None
    return {
        "test_accuracy": test["accuracy"] if test else None,
        "val_accuracy": val["accuracy"] if val else None,
    }
