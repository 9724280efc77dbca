"""Running one stage in its work directory and turning what it raises into one clear error.

Bad input (``CompressError``) and Ctrl-C pass through as they are; a full disk becomes a
one-line ``StorageError``; anything else is a ``StageFailed`` whose traceback is kept in the
stage's ``error.log`` and in ``run.log``.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from compress.config import StageConfig
from compress.context import Context
from compress.engine.records import StageFailed
from compress.errors import CompressError, StorageError
from compress.fileio import write_text
from compress.stages import StageDef
from compress.variants import StageResult, Variant

log = logging.getLogger("compress")


def execute(
    definition: StageDef, cfg: StageConfig, inputs: list[Variant], ctx: Context, workdir: Path
) -> StageResult:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "error.log").unlink(missing_ok=True)
    try:
        result = definition.run(cfg, inputs, ctx, workdir)
    except (CompressError, KeyboardInterrupt):
        raise
    except OSError as exc:
        storage = StorageError.from_os_error(exc, workdir)
        if storage is None:
            raise StageFailed(cfg.label, exc, _error_log(workdir, cfg.label)) from exc
        raise storage from None  # the CLI prints it (not logged: run.log may be on the full disk)
    except Exception as exc:
        raise StageFailed(cfg.label, exc, _error_log(workdir, cfg.label)) from exc
    for variant in result.variants:
        if not Path(variant.file).resolve().is_relative_to(workdir.resolve()):
            raise StageFailed(
                cfg.label,
                RuntimeError(f"variant file {variant.file} is outside the stage directory"),
                workdir / "error.log",
            )
    return result


def _error_log(workdir: Path, label: str) -> Path:
    """Log the exception being handled and keep its traceback in ``workdir/error.log``."""
    text = traceback.format_exc()
    log.error("stage %s failed:\n%s", label, text)
    try:
        write_text(workdir / "error.log", text)
    except OSError:  # e.g. the disk is full: the traceback is in the console output above
        pass
    return workdir / "error.log"
