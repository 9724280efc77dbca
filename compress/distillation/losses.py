"""Distillation losses: Hinton et al.'s logit loss, FitNets hints and attention transfer.

Logit distillation (``kd_loss``) tells the student only what the teacher concludes; the feature
losses also tell it how the teacher gets there, by matching an intermediate feature:

- ``hint`` (Romero et al. 2015, FitNets): the student's feature, mapped by a small learned
  regressor (a linear layer, or a 1x1 convolution for feature maps) to the teacher's width,
  is pulled to the teacher's feature by mean squared error. By default the feature is the
  classifier's input (the penultimate layer), which every model has, so an MLP student can take
  hints from a CNN teacher.
- ``attention`` (Zagoruyko & Komodakis 2017): the spatial attention maps (mean over channels of
  the squared activation, flattened and L2-normalised) of the last convolution of each model are
  matched; no parameters, but both models need feature maps.

The teacher's features are taken under ``no_grad``: the loss moves the student (and the hint
regressor, which is trained with it and never shipped), never the teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compress.measure import run_hooked
from compress.models import inspect

FeatureLossKind = Literal["hint", "attention"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy."""
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' attention map: mean_c(f^2), flattened, unit L2 norm per image."""
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Batch mean of ||Q_s - Q_t||^2 over attention maps; the larger map is pooled to the smaller."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError("attention transfer needs (N, C, H, W) feature maps from student and teacher")
    side = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    student = F.adaptive_avg_pool2d(student, side) if student.shape[2:] != side else student
    teacher = F.adaptive_avg_pool2d(teacher, side) if teacher.shape[2:] != side else teacher
    return (attention_map(student) - attention_map(teacher)).pow(2).sum(1).mean()


def hint_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets' hint: mean squared error between the regressed student feature and the teacher's."""
    if projected.shape[2:] != teacher.shape[2:]:  # feature maps of different sizes
        projected = F.interpolate(projected, size=teacher.shape[2:], mode="bilinear", align_corners=False)
    return F.mse_loss(projected.float(), teacher.float())


def regressor(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
    """The hint regressor from the student's feature width to the teacher's.

    The identity when the shapes already agree (a student that equals its teacher pays nothing),
    else a linear layer for vectors and a 1x1 convolution for feature maps.
    """
    if student_shape == teacher_shape:
        return nn.Identity()
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 4):
        raise ValueError(
            f"hint: cannot map a student feature of shape {tuple(student_shape)} to the teacher's "
            f"{tuple(teacher_shape)}; name layers of the same kind (both vectors or both feature maps)"
        )
    if len(student_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    return nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1)


def default_layer(model: nn.Module, example: torch.Tensor, kind: FeatureLossKind) -> tuple[str, str]:
    """(module name, 'input' or 'output'): where ``kind`` reads a model's feature by default.

    hint: the classifier's input (the penultimate feature); attention: the last Conv2d's output.
    """
    anatomy = inspect(model, example)
    modules = dict(model.named_modules())
    if kind == "attention":
        convs = [n for n in anatomy.order if isinstance(modules[n], nn.Conv2d)]
        if not convs:
            raise ValueError("loss: attention needs a convolution in both models; use loss: hint or kd")
        return convs[-1], "output"
    if anatomy.classifier is None:
        raise ValueError("loss: hint found no classifier layer to take the penultimate feature from")
    return anatomy.classifier, "input"


class FeatureTap:
    """Keeps the latest feature a module computed (its input or output), through a forward hook."""

    def __init__(self, model: nn.Module, layer: str, where: str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"no layer named {layer!r} in the model")
        self.value: torch.Tensor | None = None
        self._where = where
        self._handle = modules[layer].register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.value = args[0] if self._where == "input" else output

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the feature layer did not run in this forward pass")
        return value

    def remove(self) -> None:
        self._handle.remove()


class FeatureDistillation(nn.Module):
    """A feature loss between a student and a frozen teacher, added to the KD loss with ``weight``.

    ``bind`` hooks both models (and builds the hint regressor from one example's shapes); after
    each forward pass of both, ``loss()`` gives ``weight`` times the loss. Its parameters (the
    regressor's) train with the student; ``unbind`` removes the hooks.
    """

    def __init__(self, kind: FeatureLossKind, weight: float = 1.0):
        super().__init__()
        self.kind = kind
        self.weight = weight
        self.head: nn.Module = nn.Identity()
        self._taps: tuple[FeatureTap, FeatureTap] | None = None

    def bind(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None:
        """Hook both models; ``example`` (one input batch) gives the feature shapes."""
        self.unbind()
        s_layer, t_layer = (default_layer(m, example, self.kind) for m in (student, teacher))
        self._taps = (FeatureTap(student, *s_layer), FeatureTap(teacher, *t_layer))
        if self.kind == "hint" and isinstance(self.head, nn.Identity):
            for model in (student, teacher):  # eval mode, no grad: batch-norm statistics stay put
                run_hooked(model, example, {})
            s, t = (tap.take() for tap in self._taps)
            self.head = regressor(s.shape, t.shape).to(example.device)

    def loss(self) -> torch.Tensor:
        """``weight`` x the feature loss of the last forward pass of both models."""
        if self._taps is None:
            raise RuntimeError("FeatureDistillation.loss before bind")
        student, teacher = self._taps[0].take(), self._taps[1].take().detach()
        value = (
            hint_loss(self.head(student), teacher)
            if self.kind == "hint"
            else attention_loss(student, teacher)
        )
        return self.weight * value

    def unbind(self) -> None:
        for tap in self._taps or ():
            tap.remove()
        self._taps = None
