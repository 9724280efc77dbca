"""The YAML sections every stage shares: the strict base model and the training settings.

Every section forbids unknown keys, so a typo is an error with a did-you-mean instead of a
silently ignored setting that falls back to its default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_EPOCHS = 10_000


class StrictModel(BaseModel):
    """Base for every YAML section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OptimizerConfig(StrictModel):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, lt=1)


class TrainingConfig(StrictModel):
    """Shared by every stage that trains or fine-tunes a model."""

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    batch_size: int | None = Field(None, gt=0, le=65536)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: Literal["constant", "cosine", "onecycle"] = "onecycle"
    warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: Literal["none", "shift", "crop_flip"] = "none"
    amp: bool = True  # false: train in fp32 everywhere (the same as precision: fp32)
    # auto: mixed precision on CUDA (bf16 where the GPU supports it, else fp16 with a grad
    # scaler), fp32 on a CPU. bf16/fp16 need a CUDA device; fp32 turns mixed precision off.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_ends_before_training(cls, value: float, info: Any) -> float:
        epochs = info.data.get("epochs")
        if value and isinstance(epochs, int) and value >= epochs:
            raise PydanticCustomError(
                "warmup",
                "{value} is not less than epochs ({epochs}): the learning rate would never leave its "
                "warm-up; use warmup_epochs: 0 for short runs",
                {"value": value, "epochs": epochs},
            )
        return value

    @field_validator("precision")
    @classmethod
    def _amp_agrees_with_precision(cls, value: str, info: Any) -> str:
        if value in ("bf16", "fp16") and info.data.get("amp") is False:
            raise PydanticCustomError(
                "precision", "asks for mixed precision but amp is false; drop amp: false or use fp32"
            )
        return value


class SoftLabels(StrictModel):
    """Knowledge distillation from a teacher during fine-tuning (Hinton et al. 2015).

    A pruned model fine-tuned against its own unpruned input's soft labels, not the hard
    labels alone, recovers more of the input's accuracy: the teacher's logits carry which
    wrong classes are close, which the pruned weights have to relearn.
    """

    temperature: float = Field(4.0, gt=0, le=1000)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft term; 0 is plain cross-entropy
