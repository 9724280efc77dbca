"""The section of a distill stage: teacher, distilled student and scratch control side by side.

With several seeds each seed's pair is listed too, so a reader sees the spread the verdict's
pooled standard deviation stands for, not just the means.
"""

from __future__ import annotations

from typing import Any

from compress.report.formatting import fmt_int, fmt_pct, is_number


def distillation_rows(stage: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    m = stage["metrics"]
    if "teacher_test_accuracy" not in m:
        return None

    def entry(role: str, name: str | None, acc: Any, std: Any, params: Any, macs: Any) -> dict[str, Any]:
        return {
            "role": role,
            "variant": name or "–",
            "accuracy": fmt_pct(acc),
            "std": f"± {100 * float(std):.2f} pp" if is_number(std) else "",
            "parameters": fmt_int(params),
            "macs": fmt_int(macs),
        }

    student = stage.get("student")
    table = [
        entry(
            "teacher",
            m.get("teacher"),
            m.get("teacher_test_accuracy"),
            None,
            m.get("teacher_parameters"),
            m.get("teacher_macs"),
        ),
        entry(
            "distilled student",
            student,
            m.get("distilled_test_accuracy_mean"),
            m.get("distilled_test_accuracy_std"),
            m.get("student_parameters"),
            m.get("student_macs"),
        ),
    ]
    if "scratch_test_accuracy_mean" in m:
        table.append(
            entry(
                "student from scratch (control)",
                stage.get("scratch"),
                m.get("scratch_test_accuracy_mean"),
                m.get("scratch_test_accuracy_std"),
                m.get("student_parameters"),
                m.get("student_macs"),
            )
        )
    loss = m.get("loss") or "kd"
    setup = f"{m.get('seeds', 1)} seed(s), temperature {m.get('temperature')}, alpha {m.get('alpha')}, "
    if loss != "kd":
        setup += f"loss kd + {loss} (weight {m.get('feature_weight')}), "
    if m.get("augment") and m["augment"] != "none":
        setup += f"augment {m['augment']} (the teacher sees the student's augmented batch), "
    facts = [setup + f"{m.get('epochs')} epoch(s) each"]
    if is_number(m.get("parameter_ratio")):
        facts.append(
            f"The student has {1 / float(m['parameter_ratio']):.1f}x fewer parameters than the teacher."
        )
    if is_number(m.get("gain")):
        gain = f"Distillation versus scratch: {100 * float(m['gain']):+.2f} pp test accuracy"
        if is_number(m.get("gain_std")) and is_number(m.get("gain_in_std")):
            gain += (
                f", {float(m['gain_in_std']):+.1f} pooled standard deviations "
                f"({100 * float(m['gain_std']):.2f} pp; more than 2 counts as a gain)"
            )
        facts.append(gain + ".")
    if is_number(m.get("gap_closed")):
        facts.append(
            f"It closes {100 * float(m['gap_closed']):.0f} % of the gap between the scratch student "
            "and the teacher."
        )
    if m.get("verdict"):
        facts.append(f"Verdict: {m['verdict']}.")
    if is_number(m.get("stage_seconds")):
        facts.append(f"Stage wall time: {float(m['stage_seconds']):.0f} s.")
    return {"label": stage["label"], "rows": table, "seeds": _seed_rows(m), "facts": facts}


def _seed_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per seed: the distilled and scratch test accuracy and their difference (2+ seeds)."""
    by_seed: dict[Any, dict[str, Any]] = {}
    for run in m.get("runs") or []:
        by_seed.setdefault(run.get("seed"), {})[run.get("kind")] = run.get("test_accuracy")
    if len(by_seed) < 2:
        return []
    rows = []
    for seed, acc in sorted(by_seed.items(), key=lambda item: str(item[0])):
        distilled, scratch = acc.get("distilled"), acc.get("scratch")
        both = is_number(distilled) and is_number(scratch)
        rows.append(
            {
                "seed": seed,
                "distilled": fmt_pct(distilled),
                "scratch": fmt_pct(scratch),
                "gain": f"{100 * (float(distilled) - float(scratch)):+.2f} pp" if both else "–",
            }
        )
    return rows
