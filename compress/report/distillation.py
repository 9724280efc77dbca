"""The section of a distill stage: teacher, distilled student and scratch control side by side."""

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
    facts = [
        f"{m.get('seeds', 1)} seed(s), temperature {m.get('temperature')}, alpha {m.get('alpha')}, "
        f"{m.get('epochs')} epoch(s) each"
    ]
    if is_number(m.get("parameter_ratio")):
        facts.append(
            f"The student has {1 / float(m['parameter_ratio']):.1f}x fewer parameters than the teacher."
        )
    if is_number(m.get("gain")):
        facts.append(f"Distillation versus scratch: {100 * float(m['gain']):+.2f} pp test accuracy.")
    if is_number(m.get("gap_closed")):
        facts.append(
            f"It closes {100 * float(m['gap_closed']):.0f} % of the gap between the scratch student "
            "and the teacher."
        )
    if m.get("verdict"):
        facts.append(f"Verdict: {m['verdict']}.")
    return {"label": stage["label"], "rows": table, "facts": facts}
