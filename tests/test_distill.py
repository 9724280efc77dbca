"""The distill stage: the KD loss, a tiny distillation through the CLI, and an untouched teacher."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress.config import TrainingConfig, load_pipeline
from compress.data import DataBundle, Split
from compress.distillation.losses import kd_loss
from compress.distillation.teacher import Distillation
from compress.errors import ConfigError
from compress.fileio import sha256_file
from compress.models import build_model
from compress.stages import config_registry
from compress.stages import distill as distill_stage
from compress.training import FitSettings, fit
from compress.variants import Variant
from tests.conftest import TINY_PIPELINE, run_cli, write_pipeline

DISTILL = """\
  - stage: distill
    student: {arch: lenet5, width: 0.25}
    temperature: 4
    alpha: 0.9
    epochs: 1
    optimizer: {name: sgd, lr: 0.05}
    seeds: 2
"""


# ---------------------------------------------------------------- the loss


def test_kd_loss_is_cross_entropy_when_alpha_is_zero():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(32, 10, generator=gen) * 3
    teacher = torch.randn(32, 10, generator=gen) * 3
    targets = torch.randint(0, 10, (32,), generator=gen)
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(student, targets, label_smoothing=smoothing)
        got = kd_loss(student, teacher, targets, temperature=4.0, alpha=0.0, label_smoothing=smoothing)
        assert torch.allclose(got, expected)
    # with alpha > 0 the teacher matters, so the check above is not vacuous
    assert not torch.allclose(kd_loss(student, teacher, targets, 4.0, 0.5), F.cross_entropy(student, targets))


def test_kd_loss_is_minimised_by_the_teacher_logits_at_alpha_one():
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 10, generator=gen) * 2
    targets = torch.randint(0, 10, (16,), generator=gen)
    for temperature in (1.0, 4.0, 20.0):
        at_teacher = kd_loss(teacher.clone(), teacher, targets, temperature, alpha=1.0)
        assert at_teacher.abs().item() < 1e-5  # KL of a distribution with itself
        for _ in range(20):
            other = teacher + torch.randn(16, 10, generator=gen)
            assert kd_loss(other, teacher, targets, temperature, alpha=1.0) > at_teacher
        # and the one-hot labels play no part: a confident correct student still pays
        confident = F.one_hot(targets, 10).float() * 20
        assert kd_loss(confident, teacher, targets, temperature, alpha=1.0) > at_teacher
        # the minimum is stationary: zero gradient at the teacher's logits
        student = teacher.clone().requires_grad_(True)
        kd_loss(student, teacher, targets, temperature, alpha=1.0).backward()
        assert student.grad.abs().max().item() < 1e-6


def test_cached_teacher_logits_train_exactly_like_the_live_teacher(tmp_path: Path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (300,), generator=gen)
    classes = [str(i) for i in range(10)]
    bundle = DataBundle(
        "mnist", Split(x, y), Split(x[:50], y[:50]), Split(x[:50], y[:50]), classes, (0.13,), (0.31,), ""
    )
    fields = {"in_channels": 1, "image_size": 28, "num_classes": 10}
    torch.manual_seed(5)
    teacher = build_model({"arch": "lenet5", "width": 0.25, **fields}).eval()
    teacher.classifier.weight.data.mul_(50)  # confident, image-dependent logits
    with torch.no_grad():
        logits = teacher(bundle.normalize(x))
    cfg = TrainingConfig(epochs=2, batch_size=64)
    weights = []
    for cache in (None, logits, logits.flip(0)):
        torch.manual_seed(1)
        model = build_model({"arch": "mlp", "hidden": [32], **fields})
        distill = Distillation(teacher, 4.0, 0.9, cache)
        fit(
            model,
            bundle,
            FitSettings(cfg, torch.device("cpu"), 3, tmp_path / str(len(weights)), distill=distill),
        )
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)
    assert (weights[0] - weights[2]).abs().max() > 1e-2  # misaligned logits would show
    with pytest.raises(ValueError, match="augment 'none'"):
        shifted = cfg.model_copy(update={"augment": "shift"})
        distill = Distillation(teacher, 4.0, 0.9, logits)
        fit(model, bundle, FitSettings(shifted, torch.device("cpu"), 3, tmp_path / "shift", distill=distill))


# ---------------------------------------------------------------- configuration


def _load(tmp_path: Path, stage_yaml: str):
    path = write_pipeline(tmp_path, TINY_PIPELINE + stage_yaml, name="cfg")
    return load_pipeline(path, config_registry())


def test_produces_the_student_and_its_control(tmp_path: Path):
    extra = "  - {stage: distill, name: d2, control: false, output: small}\n"
    stages = _load(tmp_path, DISTILL + extra).stages
    assert stages[1].consumes(["baseline"]) == ["baseline"]
    assert stages[1].produces(["baseline"]) == ["student", "student.scratch"]
    assert stages[2].produces(["baseline"]) == ["small"]


def test_more_than_one_teacher_is_a_config_error(tmp_path: Path):
    two = DISTILL + "  - {stage: distill, name: d2, from: [baseline, student], output: s2}\n"
    with pytest.raises(ConfigError, match=r"\(d2\)\.from: the distill stage takes exactly one teacher"):
        _load(tmp_path, two)
    renamed = write_pipeline(tmp_path, TINY_PIPELINE + "    output: big\n" + DISTILL, name="renamed")
    with pytest.raises(ConfigError, match=r"\(distill\)\.from: no 'baseline' variant to distil from"):
        load_pipeline(renamed, config_registry())
    with pytest.raises(ConfigError, match="alpha"):
        _load(tmp_path, DISTILL.replace("alpha: 0.9", "alpha: 1.5"))


def test_an_onnx_teacher_is_a_config_error(tmp_path: Path):
    cfg = _load(tmp_path, DISTILL).stages[1]
    teacher = Variant("baseline.int8", "onnx", tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="teacher 'baseline.int8' is an onnx model"):
        distill_stage.run(cfg, [teacher], ctx=None, out_dir=tmp_path / "out")  # type: ignore[arg-type]


# ---------------------------------------------------------------- a tiny run through the CLI


@pytest.mark.slow
def test_tiny_distillation_through_the_cli(tmp_path: Path, data_root: Path):
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE + DISTILL)
    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert result.returncode == 0, result.output
    run_dir = (tmp_path / "artifacts" / "tiny" / "latest").resolve()
    teacher_file = (run_dir / "stages" / "train" / "model.pt").resolve()
    stage_dir = (run_dir / "stages" / "distill").resolve()
    saved = json.loads((stage_dir / "result.json").read_text())
    metrics = saved["metrics"]

    # both variants, with their lineage and measured numbers
    variants = {v["name"]: v for v in saved["variants"]}
    assert set(variants) == {"student", "student.scratch"}
    assert variants["student"]["parent"] == "baseline"
    assert variants["student.scratch"]["parent"] is None
    assert variants["student.scratch"]["info"]["control_for"] == "student"
    for name, kind in (("student", "distilled"), ("student.scratch", "scratch")):
        m = variants[name]["metrics"]
        assert 0.2 < m["test_accuracy"] <= 1 and 0.2 < m["val_accuracy"] <= 1
        assert m["parameters"] == metrics["student_parameters"]
        assert (stage_dir / variants[name]["file"]).is_file()
        first_seed = [r for r in metrics["runs"] if r["kind"] == kind and r["seed"] == 0]
        assert first_seed[0]["test_accuracy"] == m["test_accuracy"]

    # a quarter-width LeNet-5 is far smaller than the half-width teacher
    assert metrics["student_parameters"] < metrics["teacher_parameters"] / 3
    assert 0 < metrics["parameter_ratio"] < 0.34 and 0 < metrics["mac_ratio"] < 1
    # MACs per image, by hand: conv1 24*24*c1*25, conv2 8*8*c2*c1*25, fc 16*c2*f1, classifier f1*10
    assert metrics["student_macs"] == 24 * 24 * 5 * 25 + 64 * 12 * 5 * 25 + 192 * 125 + 1250  # width 0.25
    assert metrics["teacher_macs"] == 24 * 24 * 10 * 25 + 64 * 25 * 10 * 25 + 400 * 250 + 2500  # width 0.5
    assert metrics["mac_ratio"] == pytest.approx(metrics["student_macs"] / metrics["teacher_macs"])

    # two seeds each, with means and standard deviations that match the per-seed rows
    assert sorted((r["kind"], r["seed"]) for r in metrics["runs"]) == [
        ("distilled", 0),
        ("distilled", 1),
        ("scratch", 0),
        ("scratch", 1),
    ]
    for kind in ("distilled", "scratch"):
        accs = [r["test_accuracy"] for r in metrics["runs"] if r["kind"] == kind]
        assert metrics[f"{kind}_test_accuracy_mean"] == pytest.approx(sum(accs) / 2)
        assert metrics[f"{kind}_test_accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    distilled, scratch = metrics["distilled_test_accuracy_mean"], metrics["scratch_test_accuracy_mean"]
    teacher = metrics["teacher_test_accuracy"]
    assert teacher == pytest.approx(
        json.loads((run_dir / "stages" / "train" / "result.json").read_text())["metrics"]["test_accuracy"]
    )
    assert metrics["gain"] == pytest.approx(distilled - scratch)
    if teacher > scratch:
        assert metrics["gap_closed"] == pytest.approx((distilled - scratch) / (teacher - scratch))
    else:
        assert metrics["gap_closed"] is None
    noisy = abs(distilled - scratch) < 2 * metrics["gain_std"]
    assert (metrics["verdict"] == "no measurable gain") == noisy

    # the teacher is untouched: same file checksum before, after and now, same weights
    now = sha256_file(teacher_file)
    assert metrics["teacher_sha256_before"] == metrics["teacher_sha256_after"] == now
    assert metrics["teacher_weights_sha256_before"] == metrics["teacher_weights_sha256_after"]
    assert metrics["teacher_unchanged"] is True

    # the manifest carries the headline numbers, and the summary is published
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["variants"]["student"]["parent"] == "baseline"
    entry = [s for s in manifest["stages"] if s["name"] == "distill"][0]
    assert entry["metrics"]["gap_closed"] == metrics["gap_closed"]
    assert entry["metrics"]["verdict"] == metrics["verdict"]
    published = json.loads((tmp_path / "reports" / "tiny" / "distill.json").read_text())
    assert published["gain"] == metrics["gain"]

    # a second run takes everything from the cache and leaves the teacher alone
    again = run_cli(pipeline, cwd=tmp_path, data_root=data_root)
    assert again.returncode == 0, again.output
    assert re.search(r"distill\s+cached", again.output), again.output
    assert sha256_file(teacher_file) == now


# ---------------------------------------------------------------- the report's section


def test_report_section_lists_each_seed_and_the_pooled_std_verdict():
    from compress.report.distillation import distillation_rows

    runs = [
        {"seed": s, "kind": k, "test_accuracy": a}
        for s, k, a in [(0, "distilled", 0.99), (0, "scratch", 0.985), (1, "distilled", 0.991),
                        (1, "scratch", 0.984), (2, "distilled", 0.992), (2, "scratch", 0.986)]
    ]  # fmt: skip
    metrics = {
        "teacher": "baseline", "teacher_test_accuracy": 0.994, "seeds": 3, "temperature": 4, "alpha": 0.9,
        "loss": "hint", "feature_weight": 0.5, "augment": "shift", "epochs": 6,
        "distilled_test_accuracy_mean": 0.991, "distilled_test_accuracy_std": 0.001,
        "scratch_test_accuracy_mean": 0.985, "scratch_test_accuracy_std": 0.001,
        "gain": 0.006, "gain_std": 0.001, "gain_in_std": 6.0, "gap_closed": 0.667,
        "parameter_ratio": 0.2, "verdict": "distillation helps: +0.60 pp (> 2 std of 0.10 pp)",
        "stage_seconds": 123.4, "runs": runs,
    }  # fmt: skip
    section = distillation_rows({"label": "distill", "metrics": metrics}, [])
    assert [(r["seed"], r["distilled"], r["scratch"], r["gain"]) for r in section["seeds"]] == [
        (0, "99.00 %", "98.50 %", "+0.50 pp"),
        (1, "99.10 %", "98.40 %", "+0.70 pp"),
        (2, "99.20 %", "98.60 %", "+0.60 pp"),
    ]
    facts = " ".join(section["facts"])
    assert "loss kd + hint (weight 0.5)" in facts and "augment shift" in facts
    assert "+6.0 pooled standard deviations (0.10 pp; more than 2 counts as a gain)" in facts
    assert "closes 67 % of the gap" in facts and "Stage wall time: 123 s." in facts
    one_seed = {**metrics, "runs": [r for r in runs if r["seed"] == 0], "seeds": 1}
    assert distillation_rows({"label": "distill", "metrics": one_seed}, [])["seeds"] == []
