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
    """The dataset every stage trains and measures on, and how its images are shaped."""

    dataset: Literal[
        "mnist", "fashion_mnist", "kmnist", "emnist", "cifar10", "cifar100", "svhn", "stl10", "imagefolder"
    ] = Field("mnist", description="A torchvision dataset by name, or imagefolder (your own images).")
    root: str | None = Field(
        None,
        description="Data root, relative to the pipeline file (--data-root and COMPRESS_DATA_ROOT take "
        "precedence); for imagefolder, the folder holding train/ and test/; null: the user cache directory.",
    )
    emnist_split: Literal["balanced", "byclass", "bymerge", "digits", "letters", "mnist"] | None = Field(
        None, description="EMNIST's split (dataset: emnist only); null: balanced."
    )
    # square side after "resize the shorter side, then center-crop"; None: the images' own size
    image_size: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="Square side in pixels: the shorter side is resized, then center-cropped; null: the "
        "images' own size (needed for a folder of mixed sizes).",
    )
    # 1 (grayscale) or 3 (RGB); images are converted. None: the dataset's own (3 for image folders)
    channels: Literal[1, 3] | None = Field(
        None,
        description="1 (grayscale) or 3 (RGB), images are converted; null: the dataset's own (3 for image "
        "folders).",
    )
    # per-channel normalisation of pixels in [0, 1]; None: the dataset's published values, else
    # computed once from the training split and cached
    mean: list[float] | None = Field(
        None,
        description="Per-channel mean of pixels in [0, 1], given with std; null: the dataset's published "
        "values, else computed once from the training split.",
    )
    std: list[float] | None = Field(
        None,
        description="Per-channel standard deviation (each > 0), given with mean; null: as for mean.",
        json_schema_extra={"items": {"type": "number", "exclusiveMinimum": 0}},  # _positive_std
    )
    # None: 10 % of the training images, at most 5,000 (an image folder's val/ replaces the split)
    val_size: int | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="Validation images held out of the training split; null: 10 %, at most 5,000 (an "
        "image folder's val/ replaces the split).",
    )
    split_seed: int = Field(0, description="Seed of the train/validation split.")
    limit_train: int | None = Field(
        None, gt=0, description="Use only this many training images, a seeded random subset; null: all."
    )
    limit_test: int | None = Field(
        None, gt=0, description="Evaluate on only this many test images; null: all."
    )
    download: bool = Field(True, description="Download a torchvision dataset when its files are missing.")
    batch_size: int = Field(
        128, gt=0, le=65536, description="Default batch size (the stages set their own batch sizes)."
    )
    # decoded uint8 pixels of all splits together up to this size are kept in memory; beyond it
    # images stream from disk through DataLoader workers
    memory_limit_mb: int = Field(
        4096,
        ge=0,
        le=10_000_000,
        description="Decoded images up to this many MB stay in memory; beyond it they stream from disk.",
    )
    workers: int = Field(
        2, ge=0, le=64, description="DataLoader worker processes that decode images (0: in the main process)."
    )

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
