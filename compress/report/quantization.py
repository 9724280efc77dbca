"""The section of the quantize modes that train (``qat``) or decide whether to (``auto``): what static
PTQ lost, whether quantization-aware training was needed, what it recovered, and that onnxruntime
runs the file in int8."""

from __future__ import annotations

from typing import Any

from compress.report.formatting import fmt_pct, fmt_pp, is_number


def qat_rows(variants: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant a ``qat``/``auto`` mode made, in the order the variants were made."""
    rows = []
    for name, variant in variants.items():
        m = variant.metrics
        if m.get("quantization_method") not in ("ptq", "qat") or variant.info.get("mode") not in (
            "qat",
            "auto",
        ):
            continue
        mode, method = variant.info["mode"], m["quantization_method"]
        tolerance = m.get("tolerance_pp")
        if mode == "qat":
            verdict = "QAT asked for directly (mode: qat)"
        elif not m.get("qat_needed"):
            verdict = f"static PTQ met the {tolerance:g} pp tolerance: no training needed"
        else:
            verdict = (
                f"static PTQ lost {m['ptq_drop_val_pp']:.2f} pp (> {tolerance:g} pp) on the validation "
                "split: QAT was needed"
            )
            if method == "ptq":
                verdict += ", was tried and did not beat PTQ there, so the PTQ file ships"
        kernels = m.get("int8_kernels") or {}
        training = m.get("qat") or {}
        rows.append(
            {
                "variant": name,
                "parent": variant.parent,
                "mode": mode,
                "method": method.upper(),
                "weight_bits": m.get("weight_bits"),
                "ptq_drop": fmt_pp(-m["ptq_drop_val_pp"]) if is_number(m.get("ptq_drop_val_pp")) else "–",
                "val_drop": fmt_pp(m.get("delta_val_pp")),
                "test": fmt_pct(m.get("test_accuracy")),
                "test_drop": fmt_pp(m.get("delta_test_pp")),
                "kernels": ", ".join(f"{op} x{n}" for op, n in kernels.items()) or "none: runs in float",
                "training": (
                    f"{training['epochs']} epoch(s), {training['seconds']:.0f} s" if training else "–"
                ),
                "verdict": verdict,
            }
        )
    return rows
