"""Full-budget confirmation: short trials under-rate a setting, so candidates admitted with
slack are re-run with the target's own budget (validation data only), best first, and only
one that meets the constraint there is chosen.

A confirmation runs in the target stage's own work directory (``ctx.stage_workdir``) when the
engine offers it: the target then resumes from its finished training instead of repeating it,
so confirming costs no extra training time for the candidate that is chosen.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna

from compress.context import Context
from compress.tuning.constraint import drop_pp
from compress.tuning.objective import number, scored_variant, variant_metrics
from compress.tuning.selection import ranked
from compress.tuning.spec import SearchSpec
from compress.tuning.summary import chosen_json


@contextmanager
def _target_workdir(ctx: Context, target: str, params: dict[str, Any]) -> Iterator[Path | None]:
    """The target stage's own work directory for ``params`` (``ctx.stage_workdir``), or None."""
    if ctx.stage_workdir is None:
        yield None
        return
    with ctx.stage_workdir(target, params) as workdir:
        yield workdir


def confirm(
    study: optuna.Study,
    summary: dict[str, Any],
    cfg: SearchSpec,
    ctx: Context,
    out_dir: Path,
    reference: float | None,
) -> None:
    """Re-run up to ``confirm`` candidates with the target's full budget (no trial_overrides,
    validation data only), best first, and choose the first that meets the constraint without
    slack. Writes ``summary["confirmation"]`` and replaces ``summary["chosen"]``.

    A full-budget run is the expensive part, so none is spent on a candidate no more promising
    than one that already missed: after a miss, only candidates whose short-trial drop is
    smaller than every missed candidate's are confirmed. Without this rule the runs go to the
    neighbours of the first miss (the best candidates cluster at the edge of the constraint)
    and the study ends with nothing chosen while safer candidates stay untried.
    """
    assert cfg.constraint is not None and reference is not None
    candidates, _ = ranked(study.get_trials(deepcopy=False), cfg)
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    chosen = None
    bar = math.inf  # a candidate's short-trial drop must be below this to be confirmed
    for trial in candidates:
        if len(runs) == cfg.confirm:
            break
        trial_drop = float(trial.user_attrs.get("drop", 0.0))
        if trial_drop >= bar:
            skipped.append({"number": trial.number, "trial_drop": trial_drop})
            ctx.log.info(
                "%s: not confirming trial %d: its short-trial drop %.3g is not below %.3g, the "
                "smallest short-trial drop of a candidate that missed at full budget",
                cfg.label,
                trial.number,
                trial_drop,
                bar,
            )
            continue
        runs.append(_full_budget_run(trial, trial_drop, cfg, ctx, out_dir, reference))
        if runs[-1]["meets"]:
            chosen = trial
            break
        bar = min(bar, trial_drop)
    if not cfg.keep_trials:
        shutil.rmtree(out_dir / "confirm", ignore_errors=True)
    _record(summary, cfg, runs, skipped, chosen)


def _full_budget_run(
    trial: optuna.trial.FrozenTrial,
    trial_drop: float,
    cfg: SearchSpec,
    ctx: Context,
    out_dir: Path,
    reference: float,
) -> dict[str, Any]:
    """One candidate re-run with the target's full budget and checked against the constraint
    without slack: its entry in ``summary["confirmation"]["runs"]``.

    Run in the target's own work directory when the engine offers one, so a candidate that
    meets the constraint is what the target resumes from; one that misses is removed there.
    """
    assert cfg.constraint is not None
    tic = time.perf_counter()
    with _target_workdir(ctx, cfg.target, dict(trial.params)) as workdir:
        own = workdir is not None
        run_dir = workdir if own else out_dir / "confirm" / f"{trial.number:05d}"
        result = ctx.run_stage(cfg.target, dict(trial.params), run_dir)
        variant = scored_variant(result, cfg)
        metrics = variant_metrics(variant, cfg, ctx)
        value = number(metrics, cfg.constraint.metric, cfg, variant)
        drop = drop_pp(reference, value, cfg.constraint)
        meets = cfg.constraint.excess(drop) <= 0
        if own and not meets:  # never the target's settings: nothing will resume from it
            shutil.rmtree(run_dir, ignore_errors=True)
    run = {
        "number": trial.number,
        "params": trial.params,
        "metrics": metrics,
        "drop": drop,
        "trial_drop": trial_drop,
        "meets": meets,
        "seconds": round(time.perf_counter() - tic, 2),
    }
    ctx.log.info(
        "%s: confirming trial %d at full budget: %s %.6g, drop %.3f pp -> %s%s",
        cfg.label,
        trial.number,
        cfg.constraint.metric,
        value,
        drop,
        "meets the constraint" if meets else "misses the constraint",
        f" ({cfg.target} resumes from this run's training instead of repeating it)" if meets and own else "",
    )
    return run


def _record(
    summary: dict[str, Any],
    cfg: SearchSpec,
    runs: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    chosen: optuna.trial.FrozenTrial | None,
) -> None:
    """``summary["confirmation"]`` (the rule, the runs, the candidates skipped) and
    ``summary["chosen"]``: the confirmed trial with its full-budget numbers, or None."""
    assert cfg.constraint is not None
    summary["confirmation"] = {
        "candidates": cfg.confirm,
        "rule": f"best candidates first, at most {cfg.confirm} full-budget run(s), after a miss only "
        "candidates with a smaller short-trial drop than every miss; the first whose full-budget "
        f"{cfg.constraint.metric} is at most {cfg.constraint.max_drop_pp} pp below the reference",
        "runs": runs,
        "skipped": skipped,
    }
    if chosen is None:
        summary["chosen"] = None
        return
    summary["chosen"] = {
        **chosen_json(chosen),
        "confirmed_metrics": runs[-1]["metrics"],
        "confirmed_drop": runs[-1]["drop"],
    }
