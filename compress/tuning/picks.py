"""What a recipe search ships: for each objective, the best feasible trial rebuilt at full budget.

Short trials under-rate a recipe (one epoch on a subset), so their ranking only proposes
candidates. Per objective (smallest file, fastest call), candidates are rebuilt in order with
each technique's own settings on all training images and scored in the runtime again; the
first whose full-budget drop meets the constraint without slack is shipped. As in ``confirm``,
after a miss only candidates with a smaller short-trial drop than every miss are rebuilt, at
most ``budget`` per objective; a trial rebuilt for another objective is not rebuilt again, and
is a candidate for this one at no cost.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from compress.context import Context
from compress.tuning.constraint import ConstraintConfig, drop_pp
from compress.tuning.selection import ranked
from compress.variants import Variant

# what each objective's pick is called: the variant name's last part
PURPOSE = {"gzip_bytes": "smallest", "file_bytes": "smallest", "latency_ms": "fastest"}


@dataclass
class Build:
    """One candidate rebuilt at full budget: its variant, runtime metrics and verdict."""

    number: int
    recipe: str
    variant: Variant | None
    metrics: dict[str, Any]
    drop: float | None
    meets: bool
    seconds: float
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """Everything but the variant (the shipped picks carry it)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "variant"}


class Ranked:
    """A search spec seen with objective ``primary`` first, for ``selection.ranked``."""

    def __init__(self, directions: list[str], primary: int):
        self.directions, self.primary = directions, primary


def build_picks(
    study: optuna.Study,
    metrics: list[str],
    constraint: ConstraintConfig,
    reference: float,
    budget: int,
    rebuild: Callable[[FrozenTrial, Path], tuple[Variant, dict[str, Any], str]],
    out_dir: Path,
    ctx: Context,
    label: str,
) -> tuple[list[dict[str, Any]], dict[int, Build]]:
    """Per objective, the pick (``purpose``, ``metric``, the trial shipped or None, the tried
    numbers), and every full-budget build by trial number. ``budget``: rebuilds per objective."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    directions = ["minimize"] * len(metrics)
    builds: dict[int, Build] = {}
    picks = []
    for i, metric in enumerate(metrics):
        candidates, _ = ranked(trials, Ranked(directions, i))
        tried, chosen, bar, spent = [], None, math.inf, 0
        for trial in candidates:
            trial_drop = float(trial.user_attrs.get("drop", 0.0))
            if trial.number not in builds:  # a rebuild another objective made costs nothing
                if spent == budget or trial_drop >= bar:
                    continue
                builds[trial.number] = _build(trial, constraint, reference, rebuild, out_dir, ctx, label)
                spent += 1
            tried.append(trial.number)
            if builds[trial.number].meets:
                chosen = trial.number
                break
            bar = min(bar, trial_drop)
        picks.append(
            {"purpose": PURPOSE.get(metric, metric), "metric": metric, "trial": chosen, "tried": tried}
        )
    for number, build in builds.items():  # a miss is never shipped: keep only what is
        if not build.meets:
            shutil.rmtree(out_dir / f"{number:05d}", ignore_errors=True)
    return picks, builds


def _build(
    trial: FrozenTrial,
    constraint: ConstraintConfig,
    reference: float,
    rebuild: Callable[[FrozenTrial, Path], tuple[Variant, dict[str, Any], str]],
    out_dir: Path,
    ctx: Context,
    label: str,
) -> Build:
    tic = time.perf_counter()
    try:
        variant, metrics, recipe = rebuild(trial, out_dir / f"{trial.number:05d}")
    except Exception as exc:  # a step or the export failed at full budget: not shippable
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ctx.log.warning("%s: trial %d failed at full budget: %s", label, trial.number, reason)
        recipe = str(trial.user_attrs.get("metrics", {}).get("recipe", ""))
        return Build(trial.number, recipe, None, {}, None, False, round(time.perf_counter() - tic, 2), reason)
    drop = drop_pp(reference, metrics[constraint.metric], constraint)
    meets = constraint.excess(drop) <= 0
    ctx.log.info(
        "%s: trial %d (%s) at full budget: %s %.4f, drop %.3f pp -> %s",
        label,
        trial.number,
        recipe,
        constraint.metric,
        metrics[constraint.metric],
        drop,
        "meets the constraint" if meets else "misses the constraint",
    )
    return Build(trial.number, recipe, variant, metrics, drop, meets, round(time.perf_counter() - tic, 2))
