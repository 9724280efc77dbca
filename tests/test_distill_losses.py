"""The intermediate-feature distillation losses (hint, attention): zero at the teacher, gradients
to the student only, config errors, and a tiny distillation with each through the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from compress.config import load_pipeline
from compress.distillation.losses import FeatureDistillation, attention_loss, hint_loss
from compress.errors import ConfigError
from compress.models import build_model
from compress.stages import config_registry
from tests.conftest import TINY_PIPELINE, run_cli, write_pipeline

FIELDS = {"in_channels": 1, "image_size": 28, "num_classes": 10}
EXAMPLE = torch.zeros(2, 1, 28, 28)


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model({"arch": "lenet5", "width": 0.5, **FIELDS}).eval()


def _forward(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> None:
    student(x)
    with torch.no_grad():
        teacher(x)


@pytest.mark.parametrize("kind", ["hint", "attention"])
def test_zero_when_the_student_has_the_teachers_features(kind: str):
    teacher = _teacher()
    student = copy.deepcopy(teacher).train()
    features = FeatureDistillation(kind, weight=5.0)
    features.bind(student, teacher, EXAMPLE)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    _forward(student, teacher, x)
    assert features.loss().item() == pytest.approx(0.0, abs=1e-7)
    # and not zero for a different student, so the check above is not vacuous
    other = build_model({"arch": "lenet5", "width": 0.5, **FIELDS})
    features.bind(other, teacher, EXAMPLE)
    _forward(other, teacher, x)
    assert features.loss().item() > 1e-4
    features.unbind()


def test_the_plain_losses_are_zero_on_equal_features():
    f = torch.randn(4, 8, 5, 5)
    assert attention_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert hint_loss(f, f.clone()).item() == 0.0
    # a larger map is pooled to the smaller one: a constant map agrees at any size
    assert attention_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 6, 4, 4)).item() == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize(
    ("kind", "student_spec"),
    [("hint", {"arch": "mlp", "hidden": [32]}), ("hint", {"arch": "lenet5", "width": 0.25}),
     ("attention", {"arch": "lenet5", "width": 0.25})],
)  # fmt: skip
def test_gradient_flows_to_the_student_only(kind: str, student_spec: dict):
    teacher = _teacher()
    for p in teacher.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(2)
    student = build_model({**student_spec, **FIELDS})
    features = FeatureDistillation(kind)
    features.bind(student, teacher, EXAMPLE)
    _forward(student, teacher, torch.randn(8, 1, 28, 28))
    features.loss().backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    if kind == "hint":  # the regressor learns with the student
        assert all(p.grad is not None for p in features.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    features.unbind()
    assert not student._forward_hooks and not any(m._forward_hooks for m in student.modules())


def test_attention_with_an_mlp_student_is_a_one_line_config_error(tmp_path: Path):
    stage = "  - {stage: distill, student: {arch: mlp, hidden: [32]}, loss: attention}\n"
    path = write_pipeline(tmp_path, TINY_PIPELINE + stage, name="cfg")
    with pytest.raises(ConfigError) as error:
        load_pipeline(path, config_registry())
    message = str(error.value)
    assert "cfg.yaml" in message and "(distill)" in message and "attention" in message
    assert "\n" not in message.strip()
    with pytest.raises(ConfigError, match="loss"):
        bad = write_pipeline(tmp_path, TINY_PIPELINE + "  - {stage: distill, loss: hints}\n", name="bad")
        load_pipeline(bad, config_registry())


@pytest.mark.slow
def test_tiny_feature_distillation_through_the_cli(tmp_path: Path, data_root: Path):
    stages = """\
  - {stage: distill, name: hint, output: hinted, loss: hint, feature_weight: 0.5, epochs: 1,
     student: {arch: mlp, hidden: [32]}, seeds: 1, control: false}
  - {stage: distill, name: at, output: attended, loss: attention, feature_weight: 1, epochs: 1,
     student: {arch: lenet5, width: 0.25}, seeds: 1, control: false, augment: shift}
"""
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE + stages)
    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 0, result.output
    run_dir = (tmp_path / "artifacts" / "tiny" / "latest").resolve()
    for label, loss in (("hint", "hint"), ("at", "attention")):
        metrics = json.loads((run_dir / "stages" / label / "result.json").read_text())["metrics"]
        assert metrics["loss"] == loss and metrics["teacher_unchanged"] is True
        assert metrics["teacher_logits_cached"] is False  # the feature loss needs the live teacher
        assert metrics["distilled_test_accuracy_mean"] > 0.2 and metrics["stage_seconds"] > 0
    # the shipped student is the bare architecture: no regressor weights in its file
    saved = torch.load(run_dir / "stages" / "hint" / "distilled.pt", map_location="cpu", weights_only=False)
    state = saved.get("state_dict") or saved.get("model") or saved
    assert not any("head" in k for k in state if isinstance(k, str))
