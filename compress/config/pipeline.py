"""The pipeline as validated: the fields every stage has, the top level, and the result.

Stage-specific schemas live beside each stage and subclass ``StageConfig``; the loader gets
them handed in as a registry so that ``compress.config`` never imports the stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.config.data import DataConfig
from compress.config.safety import SAFE_NAME, safe_name
from compress.config.sections import StrictModel

NAME_PATTERN = f"^{SAFE_NAME.pattern}$"  # the names safe_name accepts, for the JSON Schema


class StageConfig(StrictModel):
    """Fields every stage has. Stages subclass it with their own settings.

    ``produces`` and ``consumes`` let the whole pipeline be checked before anything runs:
    a ``from:`` that names a variant no earlier stage makes is a config error, not a crash
    twenty minutes in.
    """

    stage: str = Field(description="The stage kind.")
    name: str | None = Field(
        None,
        description="Unique name of this stage (for --only, --from and --set NAME.key=...); null: the "
        "stage kind.",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    from_: list[str] | None = Field(
        None,
        alias="from",
        description="The variant(s) this stage reads, made by earlier stages; one name or a list; null: "
        "the stage's default.",
        # a single name is accepted too (_one_or_many)
        json_schema_extra={
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]
        },
    )
    # A tune stage may target this stage: its run skips the test split when ``ctx.tuning``.
    tunable: ClassVar[bool] = False

    @field_validator("from_", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _safe_stage_name(cls, value: str | None) -> str | None:
        return safe_name(value)  # a directory under artifacts/ and a file name under reports/

    @property
    def label(self) -> str:
        return self.name or self.stage

    def consumes(self, available: list[str]) -> list[str]:
        """Variant names this stage reads, given those made by earlier stages."""
        return list(self.from_) if self.from_ is not None else []

    def produces(self, inputs: list[str]) -> list[str]:
        """Variant names this stage adds, given the names it consumes."""
        return []

    def check(self, pipeline: PipelineConfig) -> None:
        """Cross-checks that need the rest of the pipeline; raise ValueError with the key."""

    def architecture(
        self, variant: str, inputs: list[str], pipeline: PipelineConfig
    ) -> dict[str, Any] | None:
        """The model spec of ``variant``, which this stage makes from ``inputs``, as far as the config
        alone tells (None: not known before the stage runs, e.g. channels cut by structured pruning)."""
        return None


class PipelineConfig(StrictModel):
    """A pipeline file: its name, seed and device, the data, and the stages run in order."""

    name: str | None = Field(
        None,
        description="The pipeline's name in artifacts/ and reports/; null: the file name without .yaml.",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    seed: int = Field(0, description="Seed of model initialisation and the training order.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (CUDA when available), cpu or cuda; --device overrides it."
    )
    data: DataConfig = Field(DataConfig(), description="The dataset and how its images are shaped.")
    stages: list[Any] = Field(min_length=1, description="The stages, run in order.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        return safe_name(value)

    def architecture_of(self, variant: str, before: StageConfig) -> dict[str, Any] | None:
        """The model spec of ``variant`` as made by a stage before ``before`` (None if unknown), so
        that a stage can check its settings against the architecture before anything trains."""
        available: list[str] = []
        for stage in self.stages:
            if stage is before:
                break
            try:
                inputs = stage.consumes(list(available))
            except ValueError:
                return None
            made = stage.produces(inputs)
            if variant in made:
                return stage.architecture(variant, inputs, self)
            available += made
        return None


class Pipeline(BaseModel):
    """A validated pipeline: where it came from and its typed stages."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: Path
    name: str
    config: PipelineConfig
    raw: dict[str, Any]

    @property
    def stages(self) -> list[StageConfig]:
        return self.config.stages
