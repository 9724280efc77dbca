"""Which trial wins: among the feasible trials (an infeasible one is recorded but never
chosen), the selection rule ranks the Pareto front, so the choice is a stated rule rather than
whatever Optuna calls best.
"""

from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState

from compress.tuning.spec import SearchSpec


def is_feasible(trial: FrozenTrial) -> bool:
    """Complete and within the constraint (as the objective recorded it)."""
    return trial.state == TrialState.COMPLETE and bool(trial.user_attrs.get("feasible", True))


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "maximize" else a < b


def _pareto(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        pairs = list(zip(a.values, b.values, directions, strict=True))
        return all(not _better(y, x, d) for x, y, d in pairs) and any(_better(x, y, d) for x, y, d in pairs)

    return [t for t in trials if not any(dominates(o, t) for o in trials if o is not t)]


def choose(trials: list[FrozenTrial], cfg: SearchSpec) -> tuple[FrozenTrial | None, list[FrozenTrial]]:
    """The chosen trial and the feasible Pareto front (infeasible trials are never chosen)."""
    candidates, front = ranked(trials, cfg)
    return (candidates[0] if candidates else None), front


def ranked(trials: list[FrozenTrial], cfg: SearchSpec) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """Feasible trials in the order the selection rule prefers them (the Pareto front first),
    and the front itself."""
    feasible = [t for t in trials if is_feasible(t)]
    front = _pareto(feasible, cfg.directions)
    order = [cfg.primary] + [i for i in range(len(cfg.directions)) if i != cfg.primary]

    def rank(t: FrozenTrial) -> tuple:
        signs = [1 if cfg.directions[i] == "minimize" else -1 for i in order]
        return (t not in front, *[s * t.values[i] for s, i in zip(signs, order, strict=True)], t.number)

    return sorted(feasible, key=rank), sorted(front, key=lambda t: t.number)
