"""The ``data:`` section: which images a pipeline trains and measures on, and how they are shaped."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from compress.config.sections import StrictModel

# torchvision's dataset classes, read from a data root in torchvision's layout
BUILTIN_DATASETS = ("mnist", "fashion_mnist", "kmnist", "emnist", "cifar10", "cifar100", "svhn", "stl10")
EMNIST_SPLITS = ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")
# the data spec's keys that change how fast images load, not which images or values a model sees
LOADING_ONLY = ("root", "download", "memory_limit_mb", "workers")


class DataConfig(StrictModel):
    dataset: Literal[
        "mnist", "fashion_mnist", "kmnist", "emnist", "cifar10", "cifar100", "svhn", "stl10", "imagefolder"
    ] = "mnist"
    root: str | None = None
    emnist_split: Literal["balanced", "byclass", "bymerge", "digits", "letters", "mnist"] | None = None
    # square side after "resize the shorter side, then center-crop"; None: the images' own size
    image_size: int | None = Field(None, ge=8, le=4096)
    # 1 (grayscale) or 3 (RGB); images are converted. None: the dataset's own (3 for image folders)
    channels: Literal[1, 3] | None = None
    # per-channel normalisation of pixels in [0, 1]; None: the dataset's published values, else
    # computed once from the training split and cached
    mean: list[float] | None = None
    std: list[float] | None = None
    # None: 10 % of the training images, at most 5,000 (an image folder's val/ replaces the split)
    val_size: int | None = Field(None, ge=0, le=1_000_000)
    split_seed: int = 0
    limit_train: int | None = Field(None, gt=0)
    limit_test: int | None = Field(None, gt=0)
    download: bool = True
    batch_size: int = Field(128, gt=0, le=65536)
    # decoded uint8 pixels of all splits together up to this size are kept in memory; beyond it
    # images stream from disk through DataLoader workers
    memory_limit_mb: int = Field(4096, ge=0, le=10_000_000)
    workers: int = Field(2, ge=0, le=64)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(s <= 0 for s in value):
            raise ValueError("every std must be > 0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.emnist_split is not None and self.dataset != "emnist":
            raise ValueError("emnist_split applies only to dataset: emnist")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together (or neither, to use the dataset's own)")
        if self.mean is not None and len(self.mean) != len(self.std or []):
            raise ValueError("mean and std need one value per channel each")
        wanted = self.channels
        if self.mean is not None and wanted is not None and len(self.mean) != wanted:
            raise ValueError(f"mean/std have {len(self.mean)} values but channels is {wanted}")
        return self

    def split_name(self) -> str:
        """EMNIST's split (balanced unless given)."""
        return self.emnist_split or "balanced"
