"""What a run is made of: the options it was started with and a record of every stage.

Shared by the runner, the cache and the run directory, so none of them imports another for
these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compress.variants import StageResult, Variant


@dataclass
class RunOptions:
    data_root: str | None = None
    data_root_from: str = "--data-root"  # or "--set data.root": both beat COMPRESS_DATA_ROOT
    device: str | None = None
    force: bool = False
    from_stage: str | None = None
    only_stage: str | None = None
    artifacts_dir: Path = Path("artifacts")
    reports_dir: Path = Path("reports")
    # --worker: run the --only stage (a tune stage) alongside other processes sharing its study
    worker: bool = False


@dataclass
class StageRecord:
    label: str
    kind: str
    status: str  # "ran" | "cached"
    seconds: float
    key: str
    directory: Path
    inputs: list[str]
    outputs: list[str]
    result: StageResult
    ahead: bool = False  # run by the process working ahead (compress.engine.ahead)


@dataclass
class RunSummary:
    pipeline: str
    run_id: str
    run_dir: Path
    reports_dir: Path
    records: list[StageRecord] = field(default_factory=list)
    variants: dict[str, Variant] = field(default_factory=dict)
    seconds: float = 0.0


class StageFailed(Exception):
    """A stage raised; the traceback is in its error.log and in run.log."""

    def __init__(self, label: str, error: BaseException, log_path: Path):
        super().__init__(f"stage {label!r} failed: {type(error).__name__}: {error}")
        self.label, self.error, self.log_path = label, error, log_path
