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
    recipes, picks = search_rows(study)
    return {
        "label": label,
        "recipes": recipes,
        "picks": picks,
        "trials": len(trials),
        "states": ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())),
        "chosen": chosen,
        "rule": study.get("selection_rule") or study.get("rule"),
        "target": study.get("target"),
    }


def _shipped_as(study: dict[str, Any]) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for pick in study.get("picks") or []:
        if isinstance(pick, dict) and isinstance(pick.get("trial"), int):
            names.setdefault(pick["trial"], []).append(str(pick.get("purpose")))
    return names


def search_rows(study: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """A search study's trials as recipe rows (what each chain was, how it scored in the runtime,
    what shipped), and one line per pick; empty for a tune study."""
    if "picks" not in study:
        return [], []
    shipped = _shipped_as(study)
    reference = (study.get("reference") or {}).get("val_accuracy")
    rows = []
    for t in study["trials"]:
        m = t.get("metrics") or {}
        acc = m.get("val_accuracy")
        drop = 100 * (reference - acc) if is_number(acc) and is_number(reference) else None
        rows.append(
            {
                "number": t.get("number"),
                "recipe": m.get("recipe") or t.get("rejected") or "",
                "state": str(t.get("state", "")).lower(),
                "val_accuracy": f"{100 * acc:.2f} %" if is_number(acc) else "",
                "drop": f"{drop:.2f}" if drop is not None else "",
                "gzip_bytes": f"{m['gzip_bytes']:,}" if is_number(m.get("gzip_bytes")) else "",
                "latency_ms": f"{m['latency_ms']:.3f}" if is_number(m.get("latency_ms")) else "",
                "feasible": {True: "yes", False: "no"}.get(t.get("feasible"), ""),
                "shipped": ", ".join(shipped.get(t.get("number"), [])),
            }
        )
    builds = {b.get("number"): b for b in study.get("builds") or [] if isinstance(b, dict)}
    lines = []
    for pick in study.get("picks") or []:
        build = builds.get(pick.get("trial"))
        if build is None:
            lines.append(
                f"{pick.get('purpose')}: nothing shipped, no candidate held the constraint at full budget"
            )
            continue
        m = build.get("metrics") or {}
        lines.append(
            f"{pick.get('purpose')}: trial {build['number']} ({build.get('recipe')}), at full budget "
            f"val accuracy {100 * m.get('val_accuracy', 0):.2f} %, drop {build.get('drop', 0):.2f} pp, "
            f"{m.get('gzip_bytes', 0):,} gzip bytes, {m.get('latency_ms', 0):.3f} ms; shipped as "
            f"{pick.get('shipped_as', '?')}"
        )
    return rows, lines


def search_charts(label: str, study: dict[str, Any]) -> list[dict[str, str]]:
    """Accuracy against each cost (size, latency) over a search's trials, picks marked."""
    if "picks" not in study:
        return []
    shipped = _shipped_as(study)
    complete = [t for t in study["trials"] if str(t.get("state")) == "COMPLETE" and t.get("metrics")]
    charts = []
    for metric, title in (("gzip_bytes", "size (gzip bytes)"), ("latency_ms", "latency (ms)")):
        points = [t for t in complete if is_number(t["metrics"].get(metric))]
        if not points:
            continue
        fig, ax = new_figure(6.5, 4.0)
        for feasible, color, marker, name in (
            (True, "#4878a8", "o", "feasible"),
            (False, "#c0392b", "x", "infeasible"),
        ):
            chosen = [t for t in points if bool(t.get("feasible")) is feasible]
            if chosen:
                ax.scatter(
                    [t["metrics"][metric] for t in chosen],
                    [100 * t["metrics"]["val_accuracy"] for t in chosen],
                    color=color,
                    marker=marker,
                    s=24,
                    label=f"{name} trial",
                )
        marked = [t for t in points if t.get("number") in shipped]
        if marked:
            ax.scatter(
                [t["metrics"][metric] for t in marked],
                [100 * t["metrics"]["val_accuracy"] for t in marked],
                facecolors="none",
                edgecolors="#222",
                s=120,
                lw=1.5,
                label="shipped (rebuilt at full budget)",
            )
        if metric == "gzip_bytes":
            ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("validation accuracy (%), short trial")
        ax.legend(fontsize=8)
        charts.append(chart(fig, f"Recipe search ({label}): accuracy vs {title}", "", "scatter"))
    return charts
