"""The search space: what one setting may take (a range or a list of choices), what type a
range draws, and the values a trial samples from it. A range's type follows the setting's
current value unless ``type:`` says otherwise, so ``epochs`` draws whole numbers.
"""

from __future__ import annotations

from typing import Any, Literal

import optuna
from pydantic import Field, model_validator

from compress.config import StageConfig, StrictModel
from compress.tuning.settings import value_at


class SpaceEntry(StrictModel):
    """One setting's range: ``low``/``high`` (``log``, ``step``) or ``choices``."""

    low: int | float | None = Field(None, description="Range: the smallest value (with high).")
    high: int | float | None = Field(None, description="Range: the largest value, > low.")
    log: bool = Field(False, description="Range: sample on a log scale (needs low > 0, no step).")
    step: int | float | None = Field(
        None,
        gt=0,
        description="Range: the step between values; null: any value.",
        # pydantic cannot write gt of a union into the JSON Schema
        json_schema_extra={"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]},
    )
    choices: list[int | float | str | bool | None] | None = Field(
        None, min_length=1, description="The values to choose from, instead of low/high."
    )
    type: Literal["int", "float"] | None = Field(
        None, description="Range: the type drawn; null: the type of the setting's current value."
    )

    @model_validator(mode="after")
    def _shape(self) -> SpaceEntry:
        if self.choices is not None:
            extra = [k for k in ("low", "high", "log", "step", "type") if k in self.model_fields_set]
            if extra:
                raise ValueError(f"give either choices or low/high, not both (also got {', '.join(extra)})")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices: [...])")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be less than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high)):
            raise ValueError("type int needs whole-number low and high")
        return self

    def contains(self, value: Any) -> bool:
        """Whether a trial could sample ``value``: one of the choices, or a number in the range."""
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, int | float) and self.low <= value <= self.high


def kind_of(path: str, entry: SpaceEntry, target: StageConfig) -> str:
    """``categorical``, ``int`` or ``float``: a range without ``type:`` takes the type of the
    target's current value at ``path``."""
    if entry.choices is not None:
        return "categorical"
    if entry.type is not None:
        return entry.type
    current = value_at(target, path)
    return "int" if isinstance(current, int) and not isinstance(current, bool) else "float"


def suggest(trial: optuna.Trial, path: str, entry: SpaceEntry, target: StageConfig | None) -> Any:
    """The value ``trial`` samples for the setting at ``path`` (the parameter's name is the path)."""
    if target is not None:
        kind = kind_of(path, entry, target)
    else:  # a search's own parameter: no stage setting to take the type from
        kind = "categorical" if entry.choices is not None else entry.type or "float"
    if kind == "categorical":
        return trial.suggest_categorical(path, entry.choices)
    if kind == "int":
        step = int(entry.step or 1)
        return trial.suggest_int(path, int(entry.low), int(entry.high), step=step, log=entry.log)
    return trial.suggest_float(path, float(entry.low), float(entry.high), step=entry.step, log=entry.log)
