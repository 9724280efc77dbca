"""After the design trials: the recipe each objective would ship now, its ranges bisected once.

The design scores every kind of chain once, its ranged settings at their middle
(``recipe.design``). A sampler asked for a few trials more draws chains it has already scored
rather than moving the leader's setting: in a 25-trial NSGA-II study of the default MNIST search
the 8 trials after the design drew the fp32 parent twice and two design chains again, and moved
the leading recipe's sparsity (0.885) not once. So once the design is scored, the leading
feasible trial of each objective (the one ``picks`` would rebuild first) runs again with each
ranged setting moved halfway to either end of its range, before the sampler takes the rest.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from compress.tuning.picks import Ranked
from compress.tuning.selection import ranked

REFINE_ATTR = "refine"
DESIGN_ATTR = "design"  # set on the design trials by the search stage


def enqueue_refinements(study: optuna.Study, objectives: int, room: int) -> int:
    """Queue at most ``room`` refinements, once, when every design trial has finished; the
    number queued."""
    trials = study.get_trials(deepcopy=False)
    design = [t for t in trials if t.user_attrs.get(DESIGN_ATTR)]
    if room <= 0 or not design or any(t.user_attrs.get(REFINE_ATTR) for t in trials):
        return 0
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in design):
        return 0
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    seen = {_key(planned(t)) for t in trials}
    queued: list[dict[str, Any]] = []
    for primary in range(objectives):
        candidates, _ = ranked(complete, Ranked(["minimize"] * objectives, primary))
        for params in _moved(candidates[0]) if candidates else []:
            if _key(params) not in seen:
                seen.add(_key(params))
                queued.append(params)
    for params in queued[:room]:
        study.enqueue_trial(params, user_attrs={REFINE_ATTR: True})
    return len(queued[:room])


def _moved(leader: FrozenTrial) -> list[dict[str, Any]]:
    """The leader's parameters with one ranged setting halfway to its upper, then lower end."""
    out = []
    for name, dist in leader.distributions.items():
        if not isinstance(dist, FloatDistribution) or name not in leader.params:
            continue
        value = float(leader.params[name])
        for end in (dist.high, dist.low):
            moved = (value + end) / 2
            if dist.step:
                moved = dist.low + round((moved - dist.low) / dist.step) * dist.step
            moved = round(min(max(moved, dist.low), dist.high), 6)
            if moved != value:
                out.append({**leader.params, name: moved})
    return out


def planned(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters, or a queued one's fixed parameters (Optuna keeps those apart)."""
    return trial.params or dict(trial.system_attrs.get("fixed_params", {}))


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, round(v, 6) if isinstance(v, float) else v) for k, v in params.items()))
