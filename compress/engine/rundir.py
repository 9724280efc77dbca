"""The run directory: its id, log file, resolved config, manifest, links and published reports.

Layout under ``artifacts/<pipeline>/``: ``<run-id>/`` holds ``config.yaml``,
``manifest.json``, ``run.log`` and ``stages/<stage>`` (links into the cache); ``latest``
links to the newest run. Reports a stage publishes are copied to ``reports/<pipeline>/``.
Every file is written to a temp name and renamed, since two runs may finish at once.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from compress import distributed
from compress.config import Pipeline, TrainingConfig, mask_secrets
from compress.context import Context
from compress.engine.records import StageRecord
from compress.fileio import read_json, sha256_file
from compress.measure import cpu_model
from compress.training import resolve_precision


def publish(record: StageRecord, reports_dir: Path) -> None:
    for source, target in record.result.publish.items():
        destination = reports_dir / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")  # runs may publish at once
        shutil.copyfile(record.directory / source, tmp)
        os.replace(tmp, destination)


def link(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")  # two runs may finish at once
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))
    os.replace(tmp, link)


def make_run_dir(base: Path) -> str:
    """A new run directory with its ``stages/`` folder, and the cache's work folder; its id."""
    run_id = new_run_id(base)
    (base / run_id / "stages").mkdir()
    (base / "cache" / ".partial").mkdir(parents=True, exist_ok=True)
    return run_id


def new_run_id(base: Path) -> str:
    """A timestamp (-2, -3, ... for runs started in the same second); makes its directory.

    ``mkdir`` either creates the directory or fails, so two processes never share an id.
    """
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = stamp, 1
    while True:
        try:
            (base / candidate).mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{stamp}-{n}"


class _RunLogHandler(logging.FileHandler):
    """run.log; if it cannot be written (a full disk), one warning and the run goes on without it."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        self.failed = True
        print(f"warning: cannot write the run log {self.baseFilename}: {error.strerror}", file=sys.stderr)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # flushing onto a full disk: those lines are lost, the run's own error is not
            pass


def attach_log_file(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def resolved_config(pipeline: Pipeline) -> dict[str, Any]:
    data = pipeline.config.model_dump(mode="json", by_alias=True, exclude={"stages"})
    data["name"] = pipeline.name
    data["stages"] = [s.model_dump(mode="json", by_alias=True) for s in pipeline.stages]
    return data


def versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in (
        "torch",
        "torchvision",
        "onnx",
        "onnxruntime",
        "torch-pruning",
        "optuna",
        "torchao",
        "compress",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def manifest_header(
    pipeline: Pipeline, run_id: str, device: torch.device, data_root: Path, data_source: str
) -> dict[str, Any]:
    return {
        "pipeline": pipeline.name,
        "pipeline_file": str(pipeline.path),
        "run_id": run_id,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": mask_secrets(" ".join(sys.argv)),  # e.g. --storage URL with a password
        "seed": pipeline.config.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        # training precision for ``precision: auto`` here (each training stage's is in its entry)
        "precision": resolve_precision(TrainingConfig(), device),
        "world_size": distributed.world_size(),  # processes under torchrun (1 without it)
        "distributed": distributed.describe() if distributed.initialized() else None,
        "data": {
            **pipeline.config.data.model_dump(mode="json"),
            "resolved_root": str(data_root),
            "root_source": data_source,
        },
        "versions": versions(),
        "stages": [],
        "variants": {},
    }


def manifest_entry(record: StageRecord, ctx: Context) -> dict[str, Any]:
    files = read_json(record.directory / "result.json")["files"]
    return {
        "name": record.label,
        "stage": record.kind,
        "status": record.status,
        "cache_key": record.key,
        "directory": str(record.directory),
        "seconds": round(record.seconds, 2),
        "inputs": {name: sha256_file(ctx.variants[name].file) for name in record.inputs},
        "outputs": {
            v.name: {
                "file": str(v.file),
                "sha256": files.get(Path(v.file).relative_to(record.directory).as_posix()),
            }
            for v in record.result.variants
        },
        "files": files,
        "metrics": brief(record.result.metrics),
    }


def brief(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars only: long histories stay in the stage's own files, not in the manifest."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}
