"""The section of a tune stage: its Optuna study summarised and charted."""

from __future__ import annotations

import math
from typing import Any

from compress.report.charts import chart, new_figure
from compress.report.formatting import is_number


def study_from(stage: dict[str, Any]) -> dict[str, Any] | None:
    """The study summary of a tune stage: from its metrics or its published study JSON."""
    for source in [stage["metrics"], *stage.get("published", {}).values()]:
        if not isinstance(source, dict):
            continue
        study = source.get("study") if isinstance(source.get("study"), dict) else source
        if isinstance(study.get("trials"), list):
            return study
    return None


def trial_values(trial: dict[str, Any]) -> list[float] | None:
    values = trial.get("values")
    if values is None and "value" in trial:
        values = [trial["value"]]
    if not isinstance(values, list) or not values or not all(is_number(v) for v in values):
        return None
    return [float(v) for v in values]


def study_charts(label: str, study: dict[str, Any]) -> list[dict[str, str]]:
    trials = [t for t in study["trials"] if isinstance(t, dict)]
    complete = [
        (t, trial_values(t))
        for t in trials
        if str(t.get("state", "COMPLETE")).upper().endswith("COMPLETE") and trial_values(t)
    ]
    charts = []
    objectives = study.get("objectives") or study.get("metric_names") or []
    names = [o.get("metric") if isinstance(o, dict) else o for o in objectives]
    directions = [o.get("direction", "maximize") for o in objectives if isinstance(o, dict)]
    directions = directions or study.get("directions") or [study.get("direction", "maximize")]
    if complete:
        fig, ax = new_figure(7.5, 3.6)
        numbers = [int(t.get("number", i)) for i, (t, _) in enumerate(complete)]
        first = [v[0] for _, v in complete]
        feasible = [t.get("feasible", True) is not False for t, _ in complete]
        ax.scatter(
            [n for n, f in zip(numbers, feasible, strict=True) if f],
            [v for v, f in zip(first, feasible, strict=True) if f],
            color="#4878a8",
            s=22,
            label="feasible trial",
        )
        if not all(feasible):
            ax.scatter(
                [n for n, f in zip(numbers, feasible, strict=True) if not f],
                [v for v, f in zip(first, feasible, strict=True) if not f],
                color="#c0392b",
                marker="x",
                s=26,
                label="infeasible trial",
            )
        maximize = str(directions[0]).lower().startswith("max")
        best, running = [], None
        for v, f in zip(first, feasible, strict=True):
            if f:
                running = v if running is None else (max if maximize else min)(running, v)
            best.append(running if running is not None else math.nan)
        ax.step(numbers, best, where="post", color="#222", lw=1, label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(str(names[0]) if names else "objective")
        ax.legend(fontsize=8)
        charts.append(chart(fig, f"Optuna study ({label}): optimization history", "", "curves"))
    two = [(t, v) for t, v in complete if len(v) >= 2]
    if two:
        fig, ax = new_figure(6.5, 4.0)
        xs, ys = [v[0] for _, v in two], [v[1] for _, v in two]
        ax.scatter(xs, ys, color="#aaa", s=20, label="trial")
        best_numbers = set(study.get("pareto_front") or study.get("best_trials") or [])
        front = [(v[0], v[1]) for t, v in two if t.get("number") in best_numbers]
        if front:
            ax.scatter(*zip(*front, strict=True), color="#c0392b", s=30, label="Pareto front")
        ax.set_xlabel(str(names[0]) if names else "objective 0")
        ax.set_ylabel(str(names[1]) if len(names) > 1 else "objective 1")
        ax.legend(fontsize=8)
        charts.append(chart(fig, f"Optuna study ({label}): Pareto front", "", "scatter"))
    importances = study.get("importances") or study.get("param_importances")
    of = ""
    per_objective = isinstance(importances, dict) and all(isinstance(v, dict) for v in importances.values())
    if importances and per_objective:
        metric, importances = next(iter(importances.items()))  # per objective: show the first
        of = f" for {metric}"
    if isinstance(importances, dict):
        importances = {k: v for k, v in importances.items() if is_number(v)}
    if isinstance(importances, dict) and importances:
        items = sorted(importances.items(), key=lambda kv: -float(kv[1]))
        fig, ax = new_figure(6.5, 0.9 + 0.35 * len(items))
        ax.barh([k for k, _ in items], [float(v) for _, v in items], color="#4878a8")
        ax.invert_yaxis()
        ax.set_xlabel("importance")
        charts.append(chart(fig, f"Optuna study ({label}): parameter importances{of}", "", "bars"))
    return charts


def study_summary(label: str, study: dict[str, Any]) -> dict[str, Any]:
    trials = [t for t in study["trials"] if isinstance(t, dict)]
    states: dict[str, int] = {}
    for t in trials:
        state = str(t.get("state", "COMPLETE")).split(".")[-1].upper()
        states[state] = states.get(state, 0) + 1
    chosen = study.get("chosen") or study.get("best_params") or study.get("best")
    if isinstance(chosen, dict) and "params" in chosen:
        params = ", ".join(
            f"{k}={v:.4g}" if is_number(v) else f"{k}={v}" for k, v in chosen["params"].items()
        )
        chosen = f"trial {chosen.get('number')}: {params}"
    return {
        "label": label,
        "trials": len(trials),
        "states": ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())),
        "chosen": chosen,
        "rule": study.get("selection_rule") or study.get("rule"),
        "target": study.get("target"),
    }
