"""The ``data:`` section: which images a pipeline trains and measures on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.config.sections import StrictModel


class DataConfig(StrictModel):
    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"
    root: str | None = None
    val_size: int = Field(5000, ge=0, le=1_000_000)
    split_seed: int = 0
    limit_train: int | None = Field(None, gt=0)
    limit_test: int | None = Field(None, gt=0)
    download: bool = True
    batch_size: int = Field(128, gt=0, le=65536)
