"""What the distill stage's runs mean and what it hands on: the seed summary and its verdict, the
stage's metrics (also the body of ``distill.json``) and the student and control variants.

With ``seeds: N`` the distilled student and its control are compared by mean and standard
deviation; a difference under two standard deviations is reported as "no measurable gain".
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from compress.distillation.job import DistillJob
from compress.gating import SCRATCH_SUFFIX
from compress.variants import Variant


def summarise(
    runs: list[dict[str, Any]], teacher_test: float | None, teacher_val: float | None
) -> dict[str, Any]:
    """Means, standard deviations, the gap share and the verdict over all seeds."""
    out: dict[str, Any] = {}
    if teacher_test is None:  # a tuning trial: only validation accuracy exists
        vals = [r["val_accuracy"] for r in runs if r["val_accuracy"] is not None]
        out["distilled_val_accuracy_mean"] = statistics.fmean(vals) if vals else None
        out["teacher_minus_student_val"] = (
            teacher_val - out["distilled_val_accuracy_mean"] if vals and teacher_val is not None else None
        )
        out["verdict"] = "tuning trial: scored on validation data, no control"
        return out
    acc: dict[str, list[float]] = {}
    for kind in ("distilled", "scratch"):
        rows = [r for r in runs if r["kind"] == kind]
        if not rows:
            continue
        acc[kind] = [r["test_accuracy"] for r in rows]
        vals = [r["val_accuracy"] for r in rows if r["val_accuracy"] is not None]
        out[f"{kind}_test_accuracy_mean"] = statistics.fmean(acc[kind])
        out[f"{kind}_test_accuracy_std"] = statistics.stdev(acc[kind]) if len(rows) > 1 else None
        out[f"{kind}_val_accuracy_mean"] = statistics.fmean(vals) if vals else None
        out[f"{kind}_seconds_mean"] = statistics.fmean(r["train_seconds"] for r in rows)
        out[f"{kind}_cpu_seconds_mean"] = statistics.fmean(r["train_cpu_seconds"] for r in rows)
    # wall time is what the user waits for; CPU time (all threads) shows what it cost when
    # other jobs share the machine
    out["seconds_per_seed"] = sum(out.get(f"{k}_seconds_mean", 0.0) for k in acc)
    out["cpu_seconds_per_seed"] = sum(out.get(f"{k}_cpu_seconds_mean", 0.0) for k in acc)
    if "scratch" not in acc:
        out["verdict"] = "no control trained (control: false): the gain of distillation is not measured"
        return out
    return {**out, **_gain(out, teacher_test, len(acc["distilled"]))}


def _gain(means: dict[str, Any], teacher_test: float, seeds: int) -> dict[str, Any]:
    """Distilled minus scratch, the share of the teacher's lead it closes, and the verdict: a
    claim either way only past two pooled standard deviations."""
    distilled, scratch = means["distilled_test_accuracy_mean"], means["scratch_test_accuracy_mean"]
    out: dict[str, Any] = {"gain": distilled - scratch, "teacher_minus_scratch": teacher_test - scratch}
    out["gap_closed"] = out["gain"] / out["teacher_minus_scratch"] if teacher_test - scratch > 0 else None
    if seeds < 2:
        out["gain_std"] = None
        out["verdict"] = "one seed: no error bar, so no claim either way (use seeds: 3 or more)"
        return out
    # Pooled standard deviation of the test accuracy of one student across seeds.
    pooled = math.sqrt(
        (means["distilled_test_accuracy_std"] ** 2 + means["scratch_test_accuracy_std"] ** 2) / 2
    )
    out["gain_std"] = pooled
    out["gain_in_std"] = out["gain"] / pooled if pooled > 0 else None
    if abs(out["gain"]) < 2 * pooled or pooled == 0 and out["gain"] == 0:
        out["verdict"] = "no measurable gain"
    elif out["gain"] > 0:
        out["verdict"] = f"distillation helps: +{100 * out['gain']:.2f} pp (> 2 std of {100 * pooled:.2f} pp)"
    else:
        out["verdict"] = f"distillation hurts: {100 * out['gain']:.2f} pp (> 2 std of {100 * pooled:.2f} pp)"
    return out


def stage_metrics(
    job: DistillJob,
    summary: dict[str, Any],
    runs: list[dict[str, Any]],
    shas_after: tuple[str, str],
    stage_started: float,
) -> dict[str, Any]:
    """The stage's metrics (also the body of distill.json): sizes, settings, the seed summary,
    the teacher checksums and every run, in the key order the report has always had."""
    cfg, setup = job.cfg, job.setup
    file_sha_after, weights_sha_after = shas_after
    teacher_size, student_size = setup.teacher_size, setup.student_size
    return {
        "teacher": job.source.name,
        "teacher_test_accuracy": setup.teacher_test,
        "teacher_val_accuracy": setup.teacher_val,
        "teacher_parameters": teacher_size["parameters"],
        "teacher_macs": teacher_size["macs"],
        "student_parameters": student_size["parameters"],
        "student_macs": student_size["macs"],
        "parameter_ratio": student_size["parameters"] / teacher_size["parameters"],
        "mac_ratio": student_size["macs"] / teacher_size["macs"] if teacher_size["macs"] else None,
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "loss": cfg.loss,
        "feature_weight": cfg.feature_weight if cfg.loss != "kd" else None,
        "augment": cfg.augment,
        "seeds": cfg.seeds,
        "epochs": cfg.epochs,
        "teacher_logits_cached": setup.cached is not None,
        **summary,
        "teacher_sha256_before": setup.file_sha_before,
        "teacher_sha256_after": file_sha_after,
        "teacher_weights_sha256_before": setup.weights_sha_before,
        "teacher_weights_sha256_after": weights_sha_after,
        "teacher_unchanged": True,
        # everything the stage did (teacher evaluation, every seed of both students), in seconds
        "stage_seconds": round(time.perf_counter() - stage_started, 2),
        "runs": runs,
    }


def build_variants(
    job: DistillJob, runs: list[dict[str, Any]], summary: dict[str, Any], metrics: dict[str, Any]
) -> list[Variant]:
    """The distilled student and, if trained, its scratch control, both from the first seed's runs
    (the ones saved to disk), each also carrying the all-seed mean and spread."""
    cfg, setup, ctx, out_dir = job.cfg, job.setup, job.ctx, job.out_dir
    first = {row["kind"]: row for row in runs if row["seed"] == ctx.seed}
    common = {
        "parameters": setup.student_size["parameters"],
        "macs": setup.student_size["macs"],
        "parameter_ratio": metrics["parameter_ratio"],
        "mac_ratio": metrics["mac_ratio"],
        "epochs": cfg.epochs,
    }
    student = Variant(
        name=cfg.output,
        format="torch",
        file=out_dir / "distilled.pt",
        stage=cfg.label,
        parent=job.source.name,
        metrics=_variant_metrics(first["distilled"], common, summary, "distilled"),
        info={
            "arch": cfg.student.arch,
            "spec": setup.student_spec,
            "teacher": job.source.name,
            "temperature": cfg.temperature,
            "alpha": cfg.alpha,
            "seed": ctx.seed,
            "curves": first["distilled"]["curves"],
        },
    )
    variants = [student]
    if "scratch" in first:
        variants.append(
            Variant(
                name=cfg.output + SCRATCH_SUFFIX,
                format="torch",
                file=out_dir / "scratch.pt",
                stage=cfg.label,
                parent=None,
                metrics=_variant_metrics(first["scratch"], common, summary, "scratch"),
                info={
                    "arch": cfg.student.arch,
                    "spec": setup.student_spec,
                    "control_for": cfg.output,
                    "note": f"control: {cfg.output}'s architecture, budget, initialisation and seed, "
                    "trained from scratch on hard labels without the teacher",
                    "seed": ctx.seed,
                    "curves": first["scratch"]["curves"],
                },
            )
        )
    return variants


def _variant_metrics(
    row: dict[str, Any], common: dict[str, Any], summary: dict[str, Any], kind: str
) -> dict[str, Any]:
    return {
        "test_accuracy": row["test_accuracy"],
        "test_correct": row["test_correct"],
        "test_count": row["test_count"],
        "val_accuracy": row["val_accuracy"],
        **common,
        "train_seconds": row["train_seconds"],
        "resumed_from_epoch": row["resumed_from_epoch"],
        "test_accuracy_mean": summary.get(f"{kind}_test_accuracy_mean"),
        "test_accuracy_std": summary.get(f"{kind}_test_accuracy_std"),
        "gap_closed": summary.get("gap_closed"),
    }
