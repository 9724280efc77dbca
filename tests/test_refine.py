"""Refinement after the design: the leading feasible recipe of each objective runs again with its
ranged setting halfway to either end, once, within the trials left."""

from __future__ import annotations

import optuna
import pytest

from compress.tuning.refine import DESIGN_ATTR, REFINE_ATTR, enqueue_refinements, planned

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(design: list[dict]) -> optuna.Study:
    """A two-objective study of (size, latency) whose design trials are scored: sparser is smaller;
    the quarter-width chain is fastest but misses the constraint."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    for params in design:
        study.enqueue_trial(params, user_attrs={DESIGN_ATTR: True})

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        width = trial.suggest_categorical("distill.student.width", [0.25, 0.5])
        amount = trial.suggest_float("prune.amount", 0.8, 0.97)
        trial.set_user_attr("feasible", width == 0.5)
        return 100 * (1 - amount) * width, width

    study.optimize(objective, n_trials=len(design))
    return study


DESIGN = [
    {"distill.student.width": 0.25, "prune.amount": 0.885},
    {"distill.student.width": 0.5, "prune.amount": 0.885},
]


def test_the_leader_moves_halfway_to_each_end_once() -> None:
    study = _study(DESIGN)
    assert enqueue_refinements(study, objectives=2, room=5) == 2
    queued = [planned(t) for t in study.get_trials(deepcopy=False) if t.user_attrs.get(REFINE_ATTR)]
    # the infeasible quarter width is never the leader; both objectives lead with the same trial
    assert queued == [
        {"distill.student.width": 0.5, "prune.amount": pytest.approx(0.9275)},
        {"distill.student.width": 0.5, "prune.amount": pytest.approx(0.8425)},
    ]
    assert enqueue_refinements(study, objectives=2, room=5) == 0  # once per study


def test_no_room_or_an_unfinished_design_queues_nothing() -> None:
    study = _study(DESIGN)
    assert enqueue_refinements(study, objectives=2, room=0) == 0
    assert enqueue_refinements(study, objectives=2, room=1) == 1  # the room caps the count
    waiting = optuna.create_study(directions=["minimize", "minimize"])
    waiting.enqueue_trial(DESIGN[1], user_attrs={DESIGN_ATTR: True})
    assert enqueue_refinements(waiting, objectives=2, room=5) == 0
