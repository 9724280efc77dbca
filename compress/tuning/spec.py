"""What the study machinery reads of a tune stage's config, written down as a Protocol: the
stage's ``TuneConfig`` (above this package) satisfies it, so the machinery needs no import of
the stage, and this list says exactly which settings a search depends on.
"""

from __future__ import annotations

from typing import Any, Protocol

from compress.config import StageConfig
from compress.tuning.constraint import ConstraintConfig
from compress.tuning.space import SpaceEntry


class SearchSpec(Protocol):
    """One search: what to vary in which stage, how to score and choose, and its budget."""

    # what is searched
    target: str
    variant: str | None
    space: dict[str, SpaceEntry]
    trial_overrides: dict[str, Any]
    enqueue_default: bool
    # how trials are scored and one is chosen
    constraint: ConstraintConfig | None
    confirm: int
    # how the study runs
    seed: int | None
    startup_trials: int | None
    population_size: int | None
    n_trials: int
    timeout: float | None
    heartbeat_interval: int
    grace_period: int | None
    max_retry: int
    keep_trials: bool

    # read-only below: derived from the config, or narrowed there to a few literal values
    @property
    def label(self) -> str: ...
    @property
    def target_config(self) -> StageConfig | None: ...
    @property
    def metrics(self) -> list[str]: ...
    @property
    def directions(self) -> list[str]: ...
    @property
    def primary(self) -> int: ...
    @property
    def selection(self) -> str: ...
    @property
    def sampler(self) -> str: ...
    @property
    def pruner(self) -> str: ...
    def against(self) -> str | None: ...
    def selection_rule(self) -> str: ...
