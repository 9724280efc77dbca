"""What a study leaves behind for people: ``study.json`` (settings, counts, the choice, the
Pareto front, importances, every trial), the flat trials table, the tune stage's metrics and
the progress line, all read from the study itself so a resumed or shared study reads the same.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from compress.tuning.selection import choose, is_feasible
from compress.tuning.spec import SearchSpec

if TYPE_CHECKING:
    import pandas as pd


def state_counts(study: optuna.Study) -> dict[TrialState, int]:
    """How many of the study's trials are in each state (every state, zeros included)."""
    counts = dict.fromkeys(TrialState, 0)
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return counts


def best_text(study: optuna.Study, cfg: SearchSpec) -> str:
    """The progress bar's note: the choice so far."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best, front = choose(trials, cfg)
    if best is None:
        return "best: none feasible yet"
    if len(cfg.metrics) == 1:
        return f"best {cfg.metrics[0]} {best.values[0]:.5g} (trial {best.number})"
    return f"pareto {len(front)}, chosen trial {best.number}"


def chosen_json(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "params": trial.params,
        "values": trial.values,
        "metrics": trial.user_attrs.get("metrics", {}),
    }


def summarize(
    study: optuna.Study,
    cfg: SearchSpec,
    reference: float | None,
    study_name: str,
    shown_url: str,
    started: float,
) -> dict[str, Any]:
    """``study.json``: the search as configured, what the study holds, and the choice."""
    trials = study.get_trials(deepcopy=False)
    chosen, front = choose(trials, cfg)
    counts = {state.name: n for state, n in state_counts(study).items() if n}
    importances: dict[str, dict[str, float]] = {}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) >= 2 and len(cfg.space) >= 1:
        for i, metric in enumerate(cfg.metrics):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    raw = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
                importances[metric] = {k: float(v) for k, v in raw.items()}
            except Exception as exc:  # too few distinct trials, a constant parameter...
                importances[metric] = {"error": f"{type(exc).__name__}: {exc}"}  # type: ignore[dict-item]
    return {
        "study_name": study_name,
        "storage": shown_url,
        "target": cfg.target,
        "objectives": [
            {"metric": m, "direction": d} for m, d in zip(cfg.metrics, cfg.directions, strict=True)
        ],
        "constraint": None
        if cfg.constraint is None
        else {**cfg.constraint.model_dump(mode="json"), "against": cfg.against(), "reference": reference},
        "space": {k: v.model_dump(mode="json", exclude_none=True) for k, v in cfg.space.items()},
        "trial_overrides": cfg.trial_overrides,
        "sampler": type(study.sampler).__name__,
        "pruner": type(study.pruner).__name__,
        "n_trials": cfg.n_trials,
        "timeout": cfg.timeout,
        "selection": cfg.selection,
        "selection_rule": cfg.selection_rule(),
        "counts": counts,
        "feasible": sum(is_feasible(t) for t in trials),
        "chosen": None if chosen is None else chosen_json(chosen),
        "pareto_front": [t.number for t in front],
        "importances": importances,
        "elapsed_seconds": round(time.perf_counter() - started, 2),
        "trials": [_trial_json(t) for t in trials],
    }


def _trial_json(t: FrozenTrial) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "values": t.values if t.state == TrialState.COMPLETE else None,  # pruned: last report only
        "last_report": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
        "params": t.params,
        "feasible": is_feasible(t) if t.state == TrialState.COMPLETE else None,
        "constraint": t.user_attrs.get("constraint"),
        "drop": t.user_attrs.get("drop"),
        "metrics": t.user_attrs.get("metrics", {}),
        "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
        "retry_of": t.system_attrs.get("failed_trial"),
        "rejected": t.user_attrs.get("rejected"),
        "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
        "completed": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None,
        "seconds": t.duration.total_seconds() if t.duration else None,
    }


def trials_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """``trials.csv``: one row a trial, its values, parameters and metrics in columns."""
    import pandas as pd  # here, not at the top: every CLI run imports the stages (0.5 s)

    rows = []
    metrics = [o["metric"] for o in summary["objectives"]]
    for t in summary["trials"]:
        row = {
            "number": t["number"],
            "state": t["state"],
            **{f"value.{m}": (t["values"][i] if t["values"] else None) for i, m in enumerate(metrics)},
            "feasible": t["feasible"],
            "constraint": t["constraint"][0] if t["constraint"] else None,
            "drop": t["drop"],
            **{f"param.{k}": v for k, v in t["params"].items()},
            "seconds": t["seconds"],
            "retry_of": t["retry_of"],
            "chosen": summary["chosen"] is not None and t["number"] == summary["chosen"]["number"],
            "pareto": t["number"] in summary["pareto_front"],
            **{f"metric.{k}": v for k, v in t["metrics"].items()},
        }
        rows.append(row)
    return pd.DataFrame(rows)


def stage_metrics(
    summary: dict[str, Any], cfg: SearchSpec, reference: float | None, test_reads: int
) -> dict[str, Any]:
    """The tune stage's metrics in the manifest and the report: the counts, the choice and its
    values and settings (``chosen.<metric>``, ``tuned.<path>``), and the summary without trials."""
    chosen = summary["chosen"]
    metrics: dict[str, Any] = {
        "study_name": summary["study_name"],
        "storage": summary["storage"],
        "target": cfg.target,
        "n_trials": cfg.n_trials,
        "trials_complete": summary["counts"].get("COMPLETE", 0),
        "trials_pruned": summary["counts"].get("PRUNED", 0),
        "trials_failed": summary["counts"].get("FAIL", 0),
        "trials_feasible": summary["feasible"],
        "selection": cfg.selection,
        "selection_rule": summary["selection_rule"],
        "chosen_trial": chosen["number"] if chosen else None,
        "reference": reference,
        "test_reads_during_tuning": test_reads,
        "tuning_seconds": summary["elapsed_seconds"],
        "confirmed": [r["number"] for r in summary.get("confirmation", {}).get("runs", [])],
    }
    if chosen:
        for metric, value in zip(cfg.metrics, chosen["values"], strict=True):
            metrics[f"chosen.{metric}"] = value
        for path, value in chosen["params"].items():
            metrics[f"tuned.{path}"] = value
    metrics["study"] = {k: v for k, v in summary.items() if k != "trials"}
    return metrics
