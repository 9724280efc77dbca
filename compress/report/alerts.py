"""The page's warnings (a model at chance, slower variants, failed exports, measurements and
parity checks) and what the gates decided (``gate_report``: failures come before warnings).

Never claim a speed-up that was not measured: a variant slower than its parent is said plainly.
Never present a model that learned nothing as a result: a variant at chance comes first.
"""

from __future__ import annotations

from typing import Any

from compress.gating import chance
from compress.gating.numbers import latency_batch_sizes
from compress.report.formatting import SPEED_NOISE, fmt_ms, fmt_pct, is_number, runtime_label, threads_text
from compress.report.inputs import ReportInputs
from compress.report.table import ok_rows

# an int8 or fp16 variant more than SPEED_NOISE (2 %) slower than its parent is a warning; any other
# variant more than 10 % slower
OTHER_SLOWDOWN = 0.10


def precision_kind(row: dict[str, Any], variants: dict[str, Any]) -> str | None:
    """'int8' or 'fp16' for a variant made to be faster or smaller by precision, else None."""
    variant = variants.get(row.get("variant"))
    mode = variant.info.get("mode") if variant is not None else None
    if mode == "fp16" or str(row.get("variant", "")).endswith(".fp16"):
        return "fp16"
    if mode in ("dynamic", "static", "qat", "auto") or "int8" in str(row.get("variant", "")):
        return "int8"
    return None


def chance_findings(rows: list[dict[str, Any]], inputs: ReportInputs) -> list[chance.AtChance]:
    """The variants at chance, by the table's rows and the training histories of their stages."""
    made = [
        (
            stage["kind"],
            stage["metrics"],
            [name for name, v in inputs.variants.items() if getattr(v, "stage", None) == stage["label"]],
        )
        for stage in inputs.stages
    ]
    classes = chance.find_num_classes(rows, inputs.variants.values())
    return chance.at_chance(rows, chance.trained_histories(made), classes)


def collect_warnings(rows: list[dict[str, Any]], inputs: ReportInputs) -> list[str]:
    at_chance = chance.warning(chance_findings(rows, inputs))
    warnings: list[str] = [at_chance] if at_chance else []
    by_key = {(r.get("variant"), r.get("runtime")): r for r in ok_rows(rows)}
    batches = latency_batch_sizes(rows)
    slow_variants: set[str] = set()
    for row in ok_rows(rows):
        parent = by_key.get((row.get("parent"), row.get("runtime")))
        if parent is None:
            continue
        slower = []
        for b in batches:
            mine, theirs = row.get(f"latency_b{b}_p50_ms"), parent.get(f"latency_b{b}_p50_ms")
            if is_number(mine) and is_number(theirs) and float(theirs) > 0:
                ratio = float(mine) / float(theirs)
                reduced = precision_kind(row, inputs.variants) is not None
                if (reduced and ratio > 1 + SPEED_NOISE) or ratio > 1 + OTHER_SLOWDOWN:
                    slower.append(f"{fmt_ms(mine)} ms vs {fmt_ms(theirs)} ms at batch {b} ({ratio:.2f}x)")
        if slower:
            kind = f"{precision_kind(row, inputs.variants) or ''} variant".strip()
            slow_variants.add(str(row["variant"]))
            warnings.append(
                f"The {kind} `{row['variant']}` is slower than its parent `{row['parent']}` in "
                f"{runtime_label(row['runtime'])}{threads_text(row)}: " + "; ".join(slower) + ". "
                "Do not ship it for speed on this CPU."
            )
    # int8 variants whose quantize stage measured a slow-down but which the benchmark did not time
    for name, variant in inputs.variants.items():
        if variant.metrics.get("slower_than_parent") and name not in slow_variants:
            if any(r.get("variant") == name for r in ok_rows(rows)) and by_key.get(
                (variant.parent, "onnxruntime")
            ):
                continue  # the benchmark timed both and found it not slower: the table is the measurement
            kind = "fp16" if variant.info.get("mode") == "fp16" else "int8"
            warnings.append(
                f"The {kind} variant `{name}` was slower than its parent `{variant.parent}` when the "
                f"quantize stage timed it ({fmt_ms(variant.metrics.get('latency_ms_p50'))} ms vs "
                f"{fmt_ms(variant.metrics.get('fp32_latency_ms_p50'))} ms at batch "
                f"{variant.metrics.get('latency_batch')})."
            )
    for row in rows:
        status = row.get("status", "ok")
        if status == "export_failed":
            warnings.append(
                f"Exporting `{row['variant']}` for {runtime_label(row['runtime'])} failed: "
                f"{row.get('error') or 'no reason given'}. That file is not shipped or measured."
            )
        elif status not in (None, "ok"):
            warnings.append(
                f"Measuring `{row['variant']}` in {runtime_label(row['runtime'])} failed: "
                f"{row.get('error') or status}."
            )
        elif row.get("export_ok") is False:
            agreement = row.get("parity_top1_agreement")
            warnings.append(
                f"The parity check of `{row['variant']}` in {runtime_label(row['runtime'])} failed: its "
                f"outputs differ from the PyTorch model (max |diff| {row.get('parity_max_abs_diff')}, "
                "top-1 agreement "
                f"{fmt_pct(agreement) if is_number(agreement) else 'unknown'})."
            )
    measured_exports = {(r.get("variant"), r.get("runtime")) for r in rows}
    runtime_of = {"onnx": "onnxruntime", "torchscript": "torchscript"}
    for stage in inputs.stages:
        if stage["kind"] == "export":
            for name, report in (stage["metrics"].get("variants") or {}).items():
                for fmt, entry in (report.get("files") or {}).items():
                    if not entry.get("ok") and (name, runtime_of.get(fmt, fmt)) not in measured_exports:
                        warnings.append(f"Exporting `{name}` to {fmt} failed: {entry.get('error')}.")
    if not any(r.get("variant") == inputs.baseline for r in ok_rows(rows)) and rows:
        warnings.append(
            f"The baseline `{inputs.baseline}` has no successful measurement, so accuracy deltas and "
            "ratios are missing."
        )
    return warnings


def gate_report(stages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the gates stages of the run decided: the counts and each failure's message
    ("gate: variant [runtime]: message"); None when no gates stage ran before the report."""
    found = [s["metrics"] for s in stages if s["kind"] == "gates"]
    if not found:
        return None
    counts = {
        key: sum(int(m[key]) for m in found if is_number(m.get(key)))
        for key in ("passed", "failed", "skipped")
    }
    failures = [text for metrics in found for text in gate_failures(metrics)]
    counts["failed"] = max(counts["failed"], len(failures))
    return {**counts, "total": sum(counts.values()), "failures": failures}


def gate_failures(metrics: dict[str, Any]) -> list[str]:
    """Failing gates from a gates stage's metrics, whatever list they are kept in."""
    failures = metrics.get("failures")
    if isinstance(failures, list) and failures:
        return [str(text) for text in failures]
    out = []
    for key in ("gates", "results", "checks"):
        entries = metrics.get(key)
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            passed = entry.get("passed", entry.get("ok"))
            if passed is None and "status" in entry:
                passed = str(entry["status"]).lower() in ("pass", "passed", "ok")
            if passed is False:
                what = entry.get("message") or " ".join(
                    str(entry[k]) for k in ("gate", "name", "variant", "value", "threshold") if k in entry
                )
                out.append(str(what))
        if out:
            return out
    failed = metrics.get("failed")
    if is_number(failed) and int(failed) > 0:
        out.append(f"{int(failed)} gate(s) failed; see gates.json")
    return out
