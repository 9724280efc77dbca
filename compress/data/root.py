"""Where datasets are looked for: the data root, chosen by a fixed precedence, and the user cache.

Precedence: a root given on the command line (``--data-root DIR`` or ``--set data.root=DIR``),
then ``COMPRESS_DATA_ROOT``, then ``data.root`` in the YAML (relative to the YAML file), then
the user cache directory. The cache also holds what this package derives from data files
(decompressed idx files, decoded image folders, file hashes, computed mean/std), so a
read-only dataset mount is never written to.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from compress.errors import DataError


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("compress"))


def default_root() -> Path:
    return cache_dir() / "datasets"


def resolve_root(
    cli_root: str | None, yaml_root: str | None, yaml_dir: Path, cli_source: str = "--data-root"
) -> tuple[Path, str]:
    """(root, where it came from) by precedence; DataError for a named root that does not exist."""
    env_root = os.environ.get("COMPRESS_DATA_ROOT")
    for value, source, base in (
        (cli_root, cli_source, Path.cwd()),
        (env_root, "COMPRESS_DATA_ROOT", Path.cwd()),
        (yaml_root, "data.root", yaml_dir),
    ):
        if value:
            path = (base / Path(value).expanduser()).resolve()
            if not path.is_dir():
                raise DataError(
                    f"data root {path} (from {source}) does not exist or is not a directory; "
                    "point it at the folder that holds the dataset (MNIST/raw, cifar-10-batches-py, "
                    "an image folder's train/ and test/, ...)"
                )
            return path, source
    return default_root(), "default cache directory"


def missing_message(dataset: str, searched: list[Path], source: str, download: bool, layout: str) -> str:
    """The offline error: every folder looked in, the layout expected, and how to give the root."""
    tried = "; the download failed (no network?)" if download else " (data.download is false)"
    places = "\n".join(f"  - {p}" for p in searched)
    return (
        f"dataset {dataset!r} not found (data root from {source or 'default'}){tried}.\n"
        f"Looked in:\n{places}\n"
        f"Provide it as {layout}, then pass --data-root DIR, set COMPRESS_DATA_ROOT=DIR, "
        "or set data.root in the pipeline YAML."
    )
