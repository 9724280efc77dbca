"""The teacher a fit distils from: its KD settings, its optional cached logits and feature loss.

``training.fit`` knows a teacher only through the ``training.Distiller`` protocol, so training
never imports this package; the stages and jobs that distil (distill, prune's and QAT's
``distill:``) build a ``Distillation`` and hand it to ``FitSettings.distill``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.data import DataBundle, iterate_batches
from compress.distillation.losses import FeatureDistillation, kd_loss
from compress.layout import channels_last
from compress.measure import EVAL_BATCH


@dataclass
class Distillation:
    """Teacher and the Hinton et al. loss settings; the teacher is never updated."""

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.5
    # Optional teacher logits for every training image, row i for bundle.train row i. Only
    # valid without augmentation (the teacher must see exactly the images the student sees);
    # it saves the teacher's forward pass in every epoch.
    logits: torch.Tensor | None = None
    # An intermediate-feature loss (hint, attention) added to the KD loss; needs the live teacher.
    features: FeatureDistillation | None = None

    def loss(
        self,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        rows: torch.Tensor | None,
        device: torch.device,
        label_smoothing: float,
    ) -> torch.Tensor:
        """One batch's KD loss against the teacher's logits plus any feature loss.

        Cached logits are looked up by ``rows`` (the batch's row indices in the training split);
        otherwise the teacher runs on ``x`` under no_grad, which also feeds the feature loss's
        hooks. The student's ``logits`` are taken in float32 whatever the autocast precision.
        """
        if self.logits is not None:
            teacher = self.logits[rows].to(device)
        else:
            with torch.no_grad():
                teacher = self.teacher(x)
        loss = kd_loss(logits.float(), teacher.float(), y, self.temperature, self.alpha, label_smoothing)
        return loss + self.features.loss() if self.features is not None else loss


@torch.no_grad()
def teacher_logits(teacher: nn.Module, bundle: DataBundle, device: torch.device) -> torch.Tensor:
    """The teacher's float32 logits for every training image, in split order (eval mode).

    Computed once per stage instead of once per batch per epoch; only valid without
    augmentation (``Distillation.logits``).
    """
    teacher.to(device).eval()
    with channels_last(teacher):
        rows = [
            teacher(x).float().cpu() for x, _ in iterate_batches(bundle, bundle.train, EVAL_BATCH, device)
        ]
    return torch.cat(rows)
