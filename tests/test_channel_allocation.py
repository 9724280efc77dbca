"""Structured pruning reaches every MACs target its architecture allows, on any weights.

A global importance ranking may remove cheap channels first (LeNet-5 on Fashion-MNIST: the 500
``fc1`` neurons ranked lowest, hit ``max_layer_amount``, and no ratio reached 2x). Here such
weights are made on purpose (``fc1`` scaled down a thousandfold), and the limit itself is
checked to come from the architecture alone, at ``--validate`` time, before anything trains.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compress import measure, pruning
from compress.models import build_model, inspect
from tests.conftest import run_cli, write_pipeline

LENET = {"arch": "lenet5", "width": 1.0, "in_channels": 1, "image_size": 28, "num_classes": 10}


def _plan(model: torch.nn.Module, x: torch.Tensor, scope: str, classes: int = 10) -> pruning.ChannelPlan:
    classifier = inspect(model, x, classes).classifier
    return pruning.ChannelPlan("group_norm", scope, 0.9, [classifier], ["Conv2d", "Linear"])


def _cheap_channels_rank_lowest() -> torch.nn.Module:
    """LeNet-5 whose fc1 neurons all look unimportant: the weights that stalled the global ranking."""
    torch.manual_seed(0)
    model = build_model(LENET).eval()
    with torch.no_grad():
        model.get_submodule("head.0").weight.mul_(1e-3)
    return model


def test_global_ranking_alone_stalls_on_such_weights() -> None:
    """The premise: one global ratio cannot reach 2x here, although the architecture can."""
    model, x = _cheap_channels_rank_lowest(), torch.randn(1, 1, 28, 28)
    macs = measure.count_macs(model, x).macs
    _, reached = pruning.ratio_for_macs(model, x, macs / 2, _plan(model, x, "global"))
    assert reached > macs / 2
    assert pruning.max_macs_reduction(model, x, _plan(model, x, "global")) > 5


@pytest.mark.parametrize("scope", ["uniform", "global", "macs"])
def test_every_scope_reaches_a_target_the_architecture_allows(scope: str) -> None:
    model, x = _cheap_channels_rank_lowest(), torch.randn(4, 1, 28, 28)
    macs = measure.count_macs(model, x[:1]).macs
    for target in (2.0, 4.0):
        pruned = copy.deepcopy(model)
        reached = pruning.prune_to_macs(pruned, x[:1], macs / target, _plan(pruned, x[:1], scope))
        assert reached <= macs / target
        assert reached == measure.count_macs(pruned, x[:1]).macs
        assert reached > macs / target / 1.5  # cut to the target, not far past it
        assert pruned(x).shape == (4, 10)
        assert pruned.get_submodule("classifier").out_features == 10


def test_the_limit_depends_on_the_architecture_not_the_weights() -> None:
    x = torch.randn(1, 1, 28, 28)
    limits = set()
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(LENET)
        limits.add(round(pruning.max_macs_reduction(model, x, _plan(model, x, "macs")), 6))
    model = _cheap_channels_rank_lowest()
    limits.add(round(pruning.max_macs_reduction(model, x, _plan(model, x, "global")), 6))
    assert len(limits) == 1, limits
    # and a stricter per-layer limit gives a lower one
    strict = pruning.ChannelPlan("group_norm", "macs", 0.5, ["classifier"], ["Conv2d", "Linear"])
    assert pruning.max_macs_reduction(model, x, strict) < limits.pop()


@pytest.mark.parametrize(
    ("name", "scope"),
    [
        ("resnet18", "uniform"),  # residual adds couple channels across blocks
        ("mobilenet_v3_small", "uniform"),  # depthwise convs, squeeze-excitation, hardswish
        ("mobilenet_v3_small", "macs"),
        ("regnet_x_400mf", "macs"),  # grouped convolutions
    ],
)
def test_torchvision_architectures_reach_half_the_macs(name: str, scope: str) -> None:
    torch.manual_seed(0)
    spec = {"arch": "torchvision", "torchvision": name, "in_channels": 3, "image_size": 32, "num_classes": 10}
    model = build_model(spec).eval()
    x = torch.randn(2, 3, 32, 32)
    macs = measure.count_macs(model, x[:1]).macs
    reached = pruning.prune_to_macs(model, x[:1], macs / 2, _plan(model, x[:1], scope))
    assert macs / 2.6 < reached <= macs / 2
    with torch.no_grad():
        assert model(x).shape == (2, 10)


STRUCTURED = """\
seed: 0
data: {{dataset: mnist}}
stages:
  - stage: train
    model: {{arch: lenet5, width: 1.0}}
    epochs: 1
  - stage: prune
    method: magnitude
  - stage: prune
    name: slim
    from: pruned
    method: structured
    target_macs_reduction: {target}
"""


@pytest.mark.slow
def test_an_unreachable_target_fails_at_validate_from_the_architecture(tmp_path: Path) -> None:
    """No data root, no training: the limit comes from LeNet-5 itself (traced through the
    magnitude-pruned variant, whose layers keep their shapes)."""
    pipeline = write_pipeline(tmp_path, STRUCTURED.format(target=50))
    result = run_cli(pipeline, "--validate", cwd=tmp_path)
    assert result.returncode == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert "stages[2] (slim).target_macs_reduction: 50.0x is unreachable for lenet5: at most" in line
    assert "max_layer_amount=0.9" in line and "Traceback" not in result.stderr
    limit = float(line.split("at most ")[1].split("x")[0])
    assert 5 < limit < 50
    ok = run_cli(
        write_pipeline(tmp_path, STRUCTURED.format(target=limit - 0.1), "ok"), "--validate", cwd=tmp_path
    )
    assert ok.returncode == 0, ok.output


def test_scope_macs_needs_a_macs_target(tmp_path: Path) -> None:
    text = STRUCTURED.format(target=2).replace("target_macs_reduction: 2", "amount: 0.3\n    scope: macs")
    result = run_cli(write_pipeline(tmp_path, text), "--validate", cwd=tmp_path)
    assert result.returncode == 2, result.output
    assert "stages[2] (slim).scope: macs allocates channels for target_macs_reduction" in result.stderr
