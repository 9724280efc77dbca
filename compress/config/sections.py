"""The YAML sections every stage shares: the strict base model and the training settings.

Every section forbids unknown keys, so a typo is an error with a did-you-mean instead of a
silently ignored setting that falls back to its default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_EPOCHS = 10_000
# BatchNorm adaptation (compress.batchnorm): the default and the largest number of batches
BN_ADAPT_BATCHES = 50
MAX_BN_ADAPT_BATCHES = 100_000


class StrictModel(BaseModel):
    """Base for every YAML section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OptimizerConfig(StrictModel):
    """The optimizer and its settings."""

    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="The optimizer: sgd, adam or adamw.")
    # the peak learning rate; auto: a range test on training images picks it (compress.lr_find)
    lr: float | Literal["auto"] = Field(
        0.05,
        description="The (peak) learning rate; auto: a learning-rate range test on training images "
        "picks it (not with schedule: constant).",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": 10},  # enforced by _number_or_auto
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(True, description="SGD with Nesterov momentum.")
    weight_decay: float = Field(5e-4, ge=0, lt=1, description="L2 weight decay.")

    @field_validator("lr", mode="before")
    @classmethod
    def _number_or_auto(cls, value: Any) -> Any:
        """One message for a bad rate (a plain union would report each of its members)."""
        if value == "auto":
            return value
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string; --set too
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PydanticCustomError(
                "lr",
                "should be a number such as 0.05, or auto (a range test picks it)",
            )
        if not 0 < value <= 10:
            raise PydanticCustomError("lr", "should be > 0 and <= 10, or auto")
        return float(value)


class TrainingConfig(StrictModel):
    """Shared by every stage that trains or fine-tunes a model."""

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS, description="Training epochs.")
    batch_size: int | None = Field(
        None,
        gt=0,
        le=65536,
        description="Training batch size; null: the stage's default (train: 128, halved down to 16 "
        "while the run would take fewer than 100 steps; elsewhere 128).",
    )
    optimizer: OptimizerConfig = Field(
        OptimizerConfig(), description="The optimizer: its name, learning rate, momentum and weight decay."
    )
    schedule: Literal["constant", "cosine", "onecycle"] = Field(
        "onecycle", description="Learning-rate schedule: onecycle, cosine or constant."
    )
    warmup_epochs: float = Field(
        0.0,
        ge=0,
        le=MAX_EPOCHS,
        description="Epochs of linear learning-rate warm-up (cosine) or of the rising part (onecycle; "
        "0: 15 % of training); must be less than epochs.",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    augment: Literal["none", "shift", "crop_flip"] = Field(
        "none",
        description="Training augmentation: none, shift (random translation by up to 2 px) or crop_flip "
        "(pad-4 random crop and horizontal flip, CIFAR).",
    )
    amp: bool = Field(True, description="false: train in fp32 everywhere (the same as precision: fp32).")
    # auto: mixed precision on CUDA (bf16 where the GPU supports it, else fp16 with a grad
    # scaler), fp32 on a CPU. bf16/fp16 need a CUDA device; fp32 turns mixed precision off.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: mixed precision on CUDA (bf16 where supported, else fp16), fp32 on a CPU; "
        "fp32 turns mixed precision off; bf16 and fp16 need a CUDA device.",
    )
    # BatchNorm adaptation after the last epoch: re-estimate every BatchNorm layer's running
    # statistics on this many training batches (a cumulative average with the final weights);
    # 0 keeps the statistics training left. See compress.batchnorm.
    bn_adapt_batches: int = Field(
        BN_ADAPT_BATCHES,
        ge=0,
        le=MAX_BN_ADAPT_BATCHES,
        description="Training batches that re-estimate every BatchNorm layer's statistics after the "
        "last epoch (kept only if not worse on validation); 0: off.",
    )

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

    @field_validator("schedule")
    @classmethod
    def _auto_lr_needs_a_peak(cls, value: str, info: Any) -> str:
        optimizer = info.data.get("optimizer")
        if value == "constant" and getattr(optimizer, "lr", None) == "auto":
            raise PydanticCustomError(
                "lr_auto",
                "constant cannot take optimizer.lr: auto: the range test picks the peak of a schedule "
                "that warms up and anneals, and a constant rate would stay at that peak; use "
                "schedule: onecycle or cosine, or give optimizer.lr a number",
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

    temperature: float = Field(4.0, gt=0, le=1000, description="Softmax temperature T of the soft labels.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the soft-label loss; 0: plain cross-entropy on hard labels."
    )
