"""The settings every stage that runs an Optuna study has (tune, search): its sampler, budget,
storage and the workers' heartbeats. One model, so both stages take the same keys with the same
descriptions, and the storage URL is checked and masked once."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_serializer, field_validator

from compress.config import StrictModel, mask_secrets
from compress.errors import ConfigError
from compress.tuning.storage import check_storage_url


class StudyFields(StrictModel):
    """How a stage's Optuna study samples, how long it runs, and where it is stored."""

    sampler: Literal["auto", "tpe", "nsga2", "random"] = Field(
        "auto", description="auto: TPE for one objective, NSGA-II for several; or tpe, nsga2, random."
    )
    n_trials: int = Field(20, ge=1, le=100_000, description="Finished trials the study ends at.")
    timeout: float | None = Field(
        None, gt=0, description="Seconds after which no new trial starts; null: none."
    )
    startup_trials: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="TPE: random trials before the model guides sampling; null: a third of n_trials (3-10).",
    )
    population_size: int | None = Field(
        None, ge=2, le=10_000, description="NSGA-II population; null: a third of n_trials (4-50)."
    )
    seed: int | None = Field(None, description="The sampler's seed; null: the pipeline's seed.")
    storage: str | None = Field(
        None,
        description="SQLAlchemy URL of the study (sqlite, postgresql, mysql, mariadb; --storage overrides); "
        "null: an SQLite file in the stage directory.",
    )
    study_name: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The study's name in the storage; null: derived from the search and its inputs.",
    )
    heartbeat_interval: int = Field(
        10, ge=1, le=3600, description="Seconds between a running trial's heartbeats in the storage."
    )
    grace_period: int | None = Field(
        None,
        ge=1,
        le=86_400,
        description="Seconds without a heartbeat before a trial counts as dead; null: Optuna's default.",
    )
    max_retry: int = Field(3, ge=0, le=100, description="Retries of a trial whose worker died.")
    keep_trials: bool = Field(False, description="Keep each trial's work directory (for debugging).")

    @field_validator("storage")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return check_storage_url(value) if value is not None else None

    @field_serializer("storage")
    def _masked(self, value: str | None) -> str | None:
        """Resolved configs, manifests and cache keys see the URL with its password masked."""
        return mask_secrets(value) if value else value

    def private_storage(self, worker: bool) -> bool:
        """True when the study lives in an SQLite file of the stage's own directory. A ``--worker``
        process cannot share such a file with the others, so there it is a config error. Read on
        the stage's config (tune, search), which has the label and the stage kind."""
        if self.storage is None and worker:
            raise ConfigError(
                f"stage {self.label!r}: --worker needs a storage every worker can reach: give "
                f"--storage URL (e.g. postgresql://user@host/db) or storage: in the {self.stage} stage"
            )
        return self.storage is None
