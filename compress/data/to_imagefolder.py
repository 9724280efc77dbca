"""Write a built-in dataset out as an ImageFolder tree of PNG files, to try ``dataset: imagefolder``.

    python -m compress.data.to_imagefolder OUT [--dataset mnist] [--data-root DIR]
                                           [--train N] [--test N] [--seed S]

writes ``OUT/train/<class>/<n>.png`` and ``OUT/test/<class>/<n>.png`` (the dataset's own
train and test files; ``--train``/``--test`` keep a seeded random subset of each). Class
folders are the dataset's class names, so they travel into the deploy bundle's labels.
Exit codes: 0 written, 2 bad input (dataset not found, OUT not empty).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from compress.config import DataConfig
from compress.config.data import BUILTIN_DATASETS
from compress.data import builtin
from compress.data.root import resolve_root
from compress.errors import CompressError, DataError


def folder_name(label: str) -> str:
    """A class name as a directory name (no path separators, no leading dot)."""
    return re.sub(r"[/\\\0]", "_", label).strip().lstrip(".") or "class"


def write_tree(
    out: Path, dataset: str, root: Path, counts: dict[str, int | None], seed: int = 0
) -> dict[str, int]:
    """Write the splits; returns how many images each got."""
    from PIL import Image

    spec = DataConfig(dataset=dataset)  # type: ignore[arg-type]
    train, test, classes = builtin.read(spec, builtin.locate(spec, root, "--data-root"))
    names = [folder_name(c) for c in classes]
    if len(set(names)) != len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    written: dict[str, int] = {}
    for split, data in (("train", train), ("test", test)):
        order = torch.arange(len(data))
        wanted = counts.get(split)
        if wanted is not None and wanted < len(data):
            order = (
                torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:wanted]
                .sort()
                .values
            )
        for name in names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for row in tqdm(order.tolist(), desc=f"writing {split}", leave=False, mininterval=1.0):
            pixels = data.x[row].numpy()
            image = pixels[0] if pixels.shape[0] == 1 else np.transpose(pixels, (1, 2, 0))
            Image.fromarray(np.ascontiguousarray(image)).save(
                out / split / names[int(data.y[row])] / f"{row:06d}.png"
            )
        written[split] = len(order)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compress.data.to_imagefolder", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out", type=Path, help="the folder to write (must be empty or new)")
    parser.add_argument("--dataset", default="mnist", choices=[d for d in BUILTIN_DATASETS if d != "emnist"])
    parser.add_argument(
        "--data-root", help="where the dataset is (default: COMPRESS_DATA_ROOT, then the user cache)"
    )
    parser.add_argument("--train", type=int, help="keep a seeded random subset of this many training images")
    parser.add_argument("--test", type=int, help="keep a seeded random subset of this many test images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets (default 0)")
    args = parser.parse_args(argv)
    try:
        if args.out.exists() and any(args.out.iterdir()):
            raise DataError(f"{args.out}: not empty; give a new or empty folder")
        root, _ = resolve_root(args.data_root, None, Path.cwd())
        counts = {"train": args.train, "test": args.test}
        written = write_tree(args.out, args.dataset, root, counts, args.seed)
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(
        f"wrote {args.out}: {written['train']} training and {written['test']} test images of {args.dataset}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
