"""The page's summary: the one-line headline for the edge team and one recommendation per objective.

Candidates are the baseline and the shipped variants within the accuracy tolerance; a
from-scratch control is never recommended, nor is a variant at chance (it learned nothing:
``compress.gating.chance``). When the baseline itself is at chance nothing is recommended.
"""

from __future__ import annotations

import math
from typing import Any

from compress import gating
from compress.gating import chance
from compress.report import paired
from compress.report.alerts import chance_findings
from compress.report.formatting import (
    SPEED_NOISE,
    file_name,
    fmt_bytes,
    fmt_ms,
    fmt_pct,
    is_number,
    runtime_label,
    threads_text,
    times,
)
from compress.report.inputs import ReportInputs
from compress.report.table import ok_rows


def baseline_rows(rows: list[dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """runtime -> the baseline's row in that runtime."""
    return {r["runtime"]: r for r in ok_rows(rows) if r.get("variant") == baseline}


def pick(candidates: list[dict[str, Any]], objective: str, batch: int | None) -> dict[str, Any] | None:
    key_latency = f"latency_b{batch}_p50_ms"
    if objective == "smallest":
        usable = [r for r in candidates if is_number(r.get("size_bytes"))]
        return min(usable, key=lambda r: (float(r["size_bytes"]), -float(r["accuracy"])), default=None)
    if objective == "smallest_download":
        usable = [r for r in candidates if is_number(r.get("gzip_bytes"))]
        return min(usable, key=lambda r: (float(r["gzip_bytes"]), -float(r["accuracy"])), default=None)
    if objective == "fastest":
        usable = [r for r in candidates if is_number(r.get(key_latency))]
        return min(usable, key=lambda r: (float(r[key_latency]), -float(r["accuracy"])), default=None)
    usable = [r for r in candidates if is_number(r.get("accuracy"))]
    size = lambda r: float(r["size_bytes"]) if is_number(r.get("size_bytes")) else math.inf  # noqa: E731
    return max(usable, key=lambda r: (float(r["accuracy"]), -size(r)), default=None)


OBJECTIVES = {
    "smallest": "the smallest file",
    "smallest_download": "the smallest download (gzip)",
    "fastest": "the lowest latency",
    "most_accurate": "the highest accuracy",
}
LABELS = {
    "smallest": "Smallest",
    "smallest_download": "Smallest download",
    "fastest": "Fastest",
    "most_accurate": "Most accurate",
}


def recommendation_sentence(
    objective: str, row: dict[str, Any], base: dict[str, Any] | None, batch: int | None, baseline: str
) -> str:
    runtime = runtime_label(row.get("runtime"))
    where = f"{runtime}{threads_text(row)}"
    if row.get("variant") == baseline:
        return (
            f"For {OBJECTIVES[objective]}, ship the baseline itself, `{file_name(row)}` ({where}): "
            "no compressed variant within the tolerance does better."
        )
    parts = []
    if (
        objective == "smallest_download"
        and is_number(row.get("gzip_bytes"))
        and is_number((base or {}).get("gzip_bytes"))
    ):
        gzip_ratio = float(row["gzip_bytes"]) / float(base["gzip_bytes"])
        parts.append(times(gzip_ratio, "smaller", "larger", "the same size") + " gzip-compressed")
    if is_number(row.get("size_ratio")):
        on_disk = " on disk" if parts else ""
        parts.append(times(float(row["size_ratio"]), "smaller", "larger", "the same size") + on_disk)
    if is_number(row.get("accuracy_delta_pp")):
        interval = paired.interval_text(row)
        parts.append(
            f"{float(row['accuracy_delta_pp']):+.2f} pp accuracy ({fmt_pct(row['accuracy'])}"
            + (f"; {interval}" if interval else "")
            + ")"
        )
    ratio = row.get(f"latency_ratio_b{batch}")
    if batch is not None and is_number(ratio):
        parts.append(times(float(ratio), "faster", "slower", "as fast") + f" at batch {batch}")
    word = (
        "as" if parts and parts[-1].startswith(("as ", "the same")) else "than"
    )  # "as fast as the baseline"
    against = (
        f"{word} the baseline in {runtime}{threads_text(row)}" if base is not None else "(no baseline row)"
    )
    more = paired.paired_sentence(row) if base is not None else ""
    return (
        f"Ship `{file_name(row)}` (variant `{row['variant']}`) for {OBJECTIVES[objective]}: "
        + ", ".join(parts)
        + f" {against}."
        + (f" {more}" if more else "")
    )


def summarize(rows: list[dict[str, Any]], inputs: ReportInputs, batch: int | None) -> dict[str, Any]:
    good = ok_rows(rows)
    bases = baseline_rows(rows, inputs.baseline)
    summary: dict[str, Any] = {"tolerance_pp": inputs.tolerance_pp, "batch": batch, "recommendations": []}
    if not good:
        summary["headline"] = "No variant was measured successfully, so there is nothing to recommend."
        return summary
    found = chance_findings(rows, inputs)
    if found:
        summary["at_chance"] = chance.warning(found)
    useless = {f.variant for f in found}
    summary["baseline"] = _baseline_sentence(bases, inputs.baseline)
    if inputs.baseline in useless:
        summary["headline"] = (
            f"Nothing to recommend: the baseline `{inputs.baseline}` is at chance level (it learned "
            "nothing), so no variant made from it is worth shipping; see the warning."
        )
        return summary
    within = _candidates(good, inputs, useless)
    picked: dict[str, dict[str, Any]] = {}
    for objective in OBJECTIVES:
        row = pick(within, objective, batch)
        if row is None or (objective == "smallest_download" and _same(row, picked.get("smallest"))):
            continue  # the smallest download is named only when it is not the smallest file
        picked[objective] = row
        summary["recommendations"].append(
            {
                "objective": objective,
                "label": LABELS[objective],
                "variant": row["variant"],
                "runtime": row["runtime"],
                "file": file_name(row),
                "path": row.get("file"),
                "sentence": recommendation_sentence(
                    objective, row, bases.get(row["runtime"]), batch, inputs.baseline
                ),
            }
        )
    summary.update(_headline(within, bases, inputs, batch))
    return summary


def _baseline_sentence(bases: dict[str, dict[str, Any]], baseline: str) -> str:
    reference = bases.get("pytorch") or next(iter(bases.values()), None)
    if reference is None:
        return (
            f"No baseline named `{baseline}` was measured, so deltas and ratios are missing; "
            "set `baseline:` in the benchmark stage."
        )
    latency = reference.get("latency_b1_p50_ms")
    return (
        f"The baseline `{baseline}` scores {fmt_pct(reference['accuracy'])} on the test split "
        f"and takes {fmt_bytes(reference.get('size_bytes'))} in {runtime_label(reference['runtime'])}"
        + (f", {fmt_ms(latency)} ms per image at batch 1" if is_number(latency) else "")
        + "."
    )


def _same(row: dict[str, Any], other: dict[str, Any] | None) -> bool:
    return other is not None and row.get("variant") == other.get("variant")


def _candidates(good: list[dict[str, Any]], inputs: ReportInputs, useless: set[str]) -> list[dict[str, Any]]:
    """The rows a recommendation may name: the baseline and shipped variants within the tolerance,
    never a from-scratch control, never one at chance."""
    return [
        r
        for r in good
        if r.get("variant") not in useless
        and (
            r.get("variant") == inputs.baseline
            or (
                gating.shipped(str(r.get("variant")))
                and is_number(r.get("accuracy_delta_pp"))
                and float(r["accuracy_delta_pp"]) >= -inputs.tolerance_pp
            )
        )
    ]


def _headline(
    within: list[dict[str, Any]], bases: dict[str, dict[str, Any]], inputs: ReportInputs, batch: int | None
) -> dict[str, Any]:
    """The one line for a newcomer (``headline``) and the file it names (``edge``): the smallest
    file within tolerance, preferably ONNX (what edge runtimes load), with what it costs."""
    out: dict[str, Any] = {}
    onnx = [r for r in within if r.get("runtime") == "onnxruntime"]
    edge = pick(onnx or within, "smallest", batch)
    if edge is None or edge.get("variant") == inputs.baseline:
        out["headline"] = (
            f"No compressed variant stays within {inputs.tolerance_pp:g} pp of the baseline's accuracy "
            "while being smaller: hand the edge team the baseline"
            + (f", `{file_name(edge)}`." if edge is not None else ".")
        )
    else:
        delta = edge.get("accuracy_delta_pp")
        cost = (
            f"it costs {-float(delta):.2f} pp of test accuracy"
            if float(delta) < 0
            else "it loses no test accuracy"
        )
        out["headline"] = (
            f"Hand the edge team `{file_name(edge)}` ({runtime_label(edge['runtime'])}): "
            f"{_compared(times(float(edge['size_ratio']), 'smaller', 'larger', 'as large'))} the baseline "
            f"and {cost} "
            f"({fmt_pct(edge['accuracy'])} vs {fmt_pct(bases[edge['runtime']]['accuracy'])}"
            f"{_cost_interval(edge) if float(delta) < 0 else ''})"
            if edge["runtime"] in bases and is_number(edge.get("size_ratio")) and is_number(delta)
            else f"Hand the edge team `{file_name(edge)}` ({runtime_label(edge['runtime'])})"
        )
        ratio = edge.get(f"latency_ratio_b{batch}")
        if is_number(ratio) and float(ratio) > 1 + SPEED_NOISE:
            out["headline"] += f"; but it is {float(ratio):.1f}x slower at batch {batch} on this CPU"
        out["headline"] += "."
        out["edge"] = {"variant": edge["variant"], "runtime": edge["runtime"], "file": file_name(edge)}
    return out


def _compared(phrase: str) -> str:
    """'4.0x smaller' -> '4.0x smaller than'; 'as large' -> 'as large as'."""
    return f"{phrase} {'as' if phrase.startswith('as ') else 'than'}"


def _cost_interval(row: dict[str, Any]) -> str:
    """'; 95 % CI of the loss 0.05 to 0.37 pp' (plus 'within the noise of N images' when it
    reaches zero), or '' without an interval."""
    bounds = paired.delta_interval(row)
    if bounds is None:
        return ""
    text = f"; {paired.confidence_text(row)} of the loss {-bounds[1]:.2f} to {-bounds[0]:.2f} pp"
    if paired.drop_is_noise(row):
        images = row.get("test_count")
        text += ": within the noise of " + (
            f"{int(images):,} test images" if is_number(images) else "the test set"
        )
    return text
