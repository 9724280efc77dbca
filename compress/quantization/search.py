"""The searches over what to leave in fp32, written against plain callables so either backend
can use them: the accuracy-aware fallback (most sensitive layers first, until the tolerance is
met) and the latency-aware search (drop from quantization what measurably slows it down)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from compress.measure import drop_pp, within_tolerance
from compress.quantization.evaluate import interleaved_ms

log = logging.getLogger("compress.quantization")


@dataclass
class Try:
    """One measured mix: the layers it kept in fp32, its validation accuracy and whether that is
    within the tolerance of the parent's."""

    excluded: list[str]
    val_accuracy: float | None
    drop_pp: float
    meets: bool
    note: str = ""

    @classmethod
    def measured(cls, parent_val: float | None, acc: float | None, tolerance: float | None, note: str) -> Try:
        """A try with nothing kept in fp32; without a validation split (``acc`` None) it never
        meets the tolerance and its drop reads 0."""
        if parent_val is None or acc is None:
            return cls([], acc, 0.0, False, note)
        return cls([], acc, drop_pp(parent_val, acc), within_tolerance(parent_val, acc, tolerance), note)

    def to_json(self) -> dict[str, Any]:
        return {
            "fp32_layers": self.excluded,
            "val_accuracy": self.val_accuracy,
            "drop_pp": round(self.drop_pp, 4),
            "meets_tolerance": self.meets,
            "note": self.note,
        }


def accuracy_step(
    mode: str,
    tolerance: float | None,
    candidates: list[str],
    val_accuracy: Callable[[list[str]], float],
    parent_val: float | None,
) -> tuple[list[str], list[Try], list[dict[str, Any]]]:
    """What a mode measures on validation before it ships (callers skip it without a validation
    split): the accuracy-aware fallback for a static variant with a tolerance, else one try of
    everything quantized, recorded with the reason there was no fallback."""
    if mode == "static" and tolerance is not None:
        return accuracy_fallback(candidates, val_accuracy, parent_val, tolerance)
    note = f"{mode}: no fallback" if mode in ("dynamic", "fp16", "weight-only") else "tolerance: null"
    return [], [Try.measured(parent_val, val_accuracy([]), tolerance, note)], []


def accuracy_fallback(
    candidates: Sequence[str],
    val_accuracy: Callable[[list[str]], float],
    parent_val: float,
    tolerance: float | None,
    log_: logging.Logger = log,
) -> tuple[list[str], list[Try], list[dict[str, Any]]]:
    """Keep the most sensitive layers in fp32 until the tolerance is met or none is left.

    ``val_accuracy(excluded)`` quantizes with ``excluded`` left in fp32 and returns the
    validation accuracy. Sensitivity is measured by leaving one layer at a time in fp32:
    the layer whose exclusion recovers the most accuracy is the most sensitive.
    Returns (layers kept in fp32, the tries in order, the sensitivity table).
    """
    memo: dict[tuple[str, ...], float] = {}

    def measure(excluded: list[str]) -> float:
        key = tuple(sorted(excluded))
        if key not in memo:
            memo[key] = val_accuracy(excluded)
        return memo[key]

    first = measure([])
    tries = [Try.measured(parent_val, first, tolerance, "all quantized")]
    if tries[0].meets or not candidates:
        return [], tries, []
    sensitivity = []
    for name in candidates:
        acc = measure([name])
        gain = round((acc - first) * 100, 4)
        sensitivity.append({"layer": name, "val_accuracy_if_fp32": acc, "recovers_pp": gain})
    ranked = [row["layer"] for row in sorted(sensitivity, key=lambda r: -r["recovers_pp"])]
    log_.info("quantize: sensitivity ranking (most sensitive first): %s", ", ".join(ranked))
    for k in range(1, len(ranked) + 1):
        excluded = ranked[:k]
        acc = measure(excluded)
        ok = within_tolerance(parent_val, acc, tolerance)
        tries.append(Try(excluded, acc, drop_pp(parent_val, acc), ok, f"{k} most sensitive in fp32"))
        log_.info("quantize: fp32 layers %s -> val %.4f (drop %.3f pp)", excluded, acc, tries[-1].drop_pp)
        if ok:
            return excluded, tries, sensitivity
    return ranked, tries, sensitivity


def layer_sensitivity(
    layers: Sequence[str],
    quantizable: Sequence[str],
    val_accuracy: Callable[[list[str]], float],
    parent_val: float,
    kept_fp32: Sequence[str],
) -> list[dict[str, Any]]:
    """Per-layer analysis (Distiller's sensitivity analysis, AIMET's layer-wise view): the
    validation drop when each layer *alone* is quantized, everything else left in fp32. It tells
    a user which layers hurt, and shows beside it which ones the fallback kept in fp32."""
    rows = []
    for name in layers:
        acc = val_accuracy([n for n in quantizable if n != name])
        rows.append(
            {
                "layer": name,
                "val_accuracy": acc,
                "drop_pp": drop_pp(parent_val, acc),
                "kept_fp32": name in kept_fp32,
            }
        )
    log.info(
        "quantize: per-layer drop when quantized alone: %s",
        ", ".join(f"{r['layer']} {r['drop_pp']:.2f} pp" for r in rows),
    )
    return rows


def latency_search(
    start: list[str],
    groups: dict[str, list[str]],
    weight_nodes: Sequence[str],
    build: Callable[[list[str]], Callable[[], Any]],
    parent: Callable[[], Any],
    accept: Callable[[list[str]], bool],
    margin: float = 0.05,
    rounds: int = 15,
    runs: int = 3,
    max_nodes: int = 16,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Greedily leave in fp32 the op types, then single layers, that make int8 slower.

    ``build(excluded)`` returns a timed runner of that mix; ``parent`` runs the fp32 model.
    Each step times every candidate beside the current mix and the parent (interleaved)
    and compares the fastest round of each (the least disturbed by other processes); the
    fastest candidate is kept only if it beats the current mix by ``margin`` and
    ``accept(excluded)`` (the accuracy tolerance) still holds and a second, independent
    comparison agrees. At least one weight layer
    stays quantized: an int8 variant with none would just be its parent. Returns the final
    exclusions and a record of every measurement.
    """
    current = list(start)
    record: list[dict[str, Any]] = []
    remaining = [n for n in weight_nodes if n not in current]
    layers = {n: [n] for n in remaining} if len(remaining) <= max_nodes else {}
    for level, options in (("op_type", dict(groups)), ("layer", layers)):
        while True:
            moves = {
                label: sorted(set(current) | set(names))
                for label, names in options.items()
                if not set(names) <= set(current)
                and any(n not in set(current) | set(names) for n in weight_nodes)
            }
            if not moves:
                break
            runners = [parent, build(current)] + [build(ex) for ex in moves.values()]
            timings = interleaved_ms(runners, rounds, runs)
            current_ms = timings[1]["min_ms"]
            step: dict[str, Any] = {
                "level": level,
                "fp32": timings[0],
                "current": {"fp32_layers": current, **timings[1]},
                "candidates": [
                    {"exclude": label, "fp32_layers": ex, **t}
                    for (label, ex), t in zip(moves.items(), timings[2:], strict=True)
                ],
            }
            record.append(step)
            best_label, best = min(zip(moves, timings[2:], strict=True), key=lambda pair: pair[1]["min_ms"])
            if best["min_ms"] >= current_ms * (1 - margin):
                step["chosen"] = None
                break
            if not accept(moves[best_label]):
                step["chosen"] = None
                step["rejected"] = f"{best_label}: misses the accuracy tolerance"
                options = {k: v for k, v in options.items() if k != best_label}
                continue
            # confirm in a fresh interleaved comparison, so one lucky round cannot decide
            confirm = interleaved_ms([build(current), build(moves[best_label])], rounds, runs)
            step["confirm"] = {"current": confirm[0], "candidate": confirm[1]}
            if confirm[1]["min_ms"] >= confirm[0]["min_ms"] * (1 - margin):
                step["chosen"] = None
                step["rejected"] = f"{best_label}: not faster when measured again"
                options = {k: v for k, v in options.items() if k != best_label}
                continue
            step["chosen"] = best_label
            current = moves[best_label]
    return current, record
