"""Image files and pixel tensors shaped the way the model takes them.

Decoding is Pillow's, resizing torchvision's (``transforms.v2.functional``), so what a user's
own pipeline does with the same library gives the same pixels. ``ImageShape`` is the one rule
for every source: resize the shorter side to ``size`` (bilinear, antialiased), center-crop a
``size`` x ``size`` square, convert to 1 (grayscale) or 3 (RGB) channels. Files that cannot be
brought to 8-bit grayscale/RGB faithfully (16/32-bit, CMYK) are refused, not guessed at.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import DataError

# Pillow modes that are 8 bits per channel (or fewer) and convert to L/RGB without loss of meaning
CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "La", "RGBa", "YCbCr"}
HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S"}


class ImageProblem(ValueError):
    """A file that is not an image we can use; the message says why and what to do."""


@dataclass(frozen=True)
class ImageShape:
    """How a raw image becomes model pixels: a square side (None: keep) and a channel count."""

    size: int | None
    channels: int

    @property
    def color(self) -> str:
        return "RGB" if self.channels == 3 else "grayscale"

    def describe(self) -> dict[str, object]:
        """The recipe as recorded in the deploy bundle's preprocessing."""
        recipe: dict[str, object] = {"color": self.color, "channels": self.channels}
        if self.size is not None:
            recipe["resize"] = (
                f"resize the shorter side to {self.size} px (bilinear, antialiased), then center-crop "
                f"{self.size}x{self.size}"
            )
            recipe["image_size"] = self.size
        return recipe

    def apply(self, image: object) -> torch.Tensor:
        """A Pillow image -> uint8 (C, H, W)."""
        from torchvision.transforms.v2 import functional as tvf

        converted = image.convert("L" if self.channels == 1 else "RGB")  # type: ignore[attr-defined]
        if self.size is not None:
            converted = tvf.resize(converted, self.size, antialias=True)
            converted = tvf.center_crop(converted, [self.size, self.size])
        return tvf.pil_to_tensor(converted)

    def apply_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """The same rule on a uint8 batch (N, C, H, W), for datasets that arrive as arrays."""
        from torchvision.transforms.v2 import functional as tvf

        if x.shape[1] != self.channels:
            x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else tvf.rgb_to_grayscale(x)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = tvf.center_crop(tvf.resize(x, self.size, antialias=True), [self.size, self.size])
        return x.contiguous()


def open_image(path: Path) -> object:
    """The file opened with Pillow (header only), or ImageProblem naming what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning: the size check below decides
            image = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageProblem(f"not a readable image ({type(exc).__name__}: {exc})") from None
    mode = image.mode
    if mode in HIGH_DEPTH_MODES:
        raise ImageProblem(
            f"{mode} image: more than 8 bits per channel (e.g. a 16-bit PNG); convert it to 8-bit "
            "grayscale or RGB, e.g. with Pillow: Image.open(p).point(lambda v: v / 256).convert('L')"
        )
    if mode == "CMYK":
        raise ImageProblem(
            "CMYK image: its colours would change in a naive conversion; convert it to RGB with a "
            "colour-managed tool (e.g. ImageMagick: convert in.jpg -colorspace sRGB out.jpg)"
        )
    if mode not in CONVERTIBLE_MODES:
        raise ImageProblem(f"image mode {mode!r} is not supported; convert it to 8-bit grayscale or RGB")
    return image


def decode(path: Path, shape: ImageShape) -> torch.Tensor:
    """uint8 (C, H, W) pixels of one file, or ImageProblem (e.g. a truncated file)."""
    image = open_image(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notices
            image.load()  # type: ignore[attr-defined]
            return shape.apply(image)
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's truncated/corrupt-data errors
        raise ImageProblem(f"cannot be decoded ({type(exc).__name__}: {exc}); the file is damaged") from None
    finally:
        image.close()  # type: ignore[attr-defined]


class DecodedFiles(torch.utils.data.Dataset):
    """Rows for a DataLoader: (pixels, row index, problem text). A problem travels back as text,
    so the main process raises one clear DataError instead of a worker's traceback."""

    def __init__(self, paths: Sequence[Path], shape: ImageShape, blank: tuple[int, int, int]):
        self.paths, self.shape, self.blank = list(paths), shape, blank

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            pixels = decode(self.paths[index], self.shape)
        except ImageProblem as exc:
            return torch.zeros(self.blank, dtype=torch.uint8), index, f"{self.paths[index]}: {exc}"
        if tuple(pixels.shape) != self.blank:
            problem = f"{self.paths[index]}: decodes to {tuple(pixels.shape)}, expected {self.blank}"
            return torch.zeros(self.blank, dtype=torch.uint8), index, problem
        return pixels, index, ""


def decoded_batches(
    paths: Sequence[Path], shape: ImageShape, blank: tuple[int, int, int], order: Sequence[int],
    batch_size: int, workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:  # fmt: skip
    """(pixels, rows, problems) batches of ``paths`` in ``order``, decoded by ``workers`` processes."""
    loader = torch.utils.data.DataLoader(
        DecodedFiles(paths, shape, blank),
        batch_size=batch_size,
        sampler=list(order),
        num_workers=workers,
        persistent_workers=False,
    )
    for pixels, rows, problems in loader:
        yield pixels, rows, [p for p in problems if p]


class DiskImages:
    """Images decoded from their files when read: what a split holds when the decoded dataset
    would not fit ``data.memory_limit_mb``. Indexing decodes in this process (small reads such
    as a calibration sample); training streams them through ``decoded_batches``."""

    dtype = torch.uint8

    def __init__(self, paths: Sequence[Path], shape: ImageShape, side: int):
        self.paths, self.image_shape, self.side = list(paths), shape, side

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.image_shape.channels, self.side, self.side)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: torch.Tensor | slice) -> DiskImages:
        rows = range(len(self.paths))[index] if isinstance(index, slice) else index.tolist()
        return DiskImages([self.paths[i] for i in rows], self.image_shape, self.side)

    def __getitem__(self, index: torch.Tensor | slice | int) -> torch.Tensor:
        part = self.subset(torch.tensor([index]) if isinstance(index, int) else index)
        rows = []
        for path in part.paths:
            try:
                rows.append(decode(path, self.image_shape))
            except ImageProblem as exc:
                raise DataError(f"{path}: {exc}") from None
        if not rows:
            return torch.zeros((0, *self.shape[1:]), dtype=torch.uint8)
        stacked = torch.stack(rows)
        return stacked[0] if isinstance(index, int) else stacked
