"""``compress.run_pipeline``: the CLI's run, called from Python (a notebook, a script, a test).

It loads, runs and sums up a pipeline through the same steps as ``python -m compress.run``
(the shared functions of compress/run.py), and turns the CLI's exit codes into exceptions
carrying the message the CLI prints: ``CompressError`` and its subclasses (2, bad input),
``GateFailure`` (1, with the ``RunResult`` as ``.result``), ``StageFailure`` (3, with the log
path). A Ctrl-C stays a KeyboardInterrupt (the CLI's 130). It never exits the interpreter,
and hands back the caller's logging set-up, working directory and torch thread counts as
they were: a CLI process may keep what a run sets, a notebook kernel may not.

One process: under torchrun use the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from compress import run as cli
from compress.config import mask_secrets
from compress.engine import RunSummary, StageFailed
from compress.engine import run_pipeline as run_engine
from compress.errors import CompressError, GateFailure, StorageError
from compress.gating import Outcome
from compress.results import ResultsTable

log = logging.getLogger("compress")

# how a run's messages name the two ways of giving a data root (the CLI: --data-root, --set data.root)
DATA_ROOT_FROM = ("data_root", "overrides data.root")


class StageFailure(StageFailed):
    """A stage raised something that is not bad input (the CLI's exit code 3).

    ``str()`` is the CLI's message, ending with where the full traceback is (``log_path``);
    ``error`` is what the stage raised (also the ``__cause__``). A StageFailed, so code that
    catches the engine's error catches this one too.
    """

    exit_code = cli.EXIT_STAGE_FAILED

    def __init__(self, failed: StageFailed):
        super().__init__(failed.label, failed.error, failed.log_path)
        self.args = (cli.stage_failed_message(failed),)


@dataclass(frozen=True)
class Gates:
    """The quality gates' outcomes, by gates stage in run order (none: no gates stage, passed)."""

    by_stage: dict[str, list[Outcome]] = field(default_factory=dict)
    failed: int = 0

    @property
    def passed(self) -> bool:
        return self.failed == 0

    @property
    def outcomes(self) -> list[Outcome]:
        return [outcome for outcomes in self.by_stage.values() for outcome in outcomes]

    def to_dicts(self) -> list[dict[str, Any]]:
        """One dict per outcome (as in reports/<pipeline>/gates.json), with its stage's label."""
        return [{"stage": label, **o.to_json()} for label, found in self.by_stage.items() for o in found]


@dataclass
class RunResult:
    """What a finished run gives back; the files behind it stay where the CLI puts them."""

    table: pd.DataFrame  # reports/<pipeline>/results.json of this run (empty: no benchmark or report)
    gates: Gates
    bundle: Path | None  # the deploy bundle folder, absolute (None: no export stage)
    run_dir: Path  # absolute, as are the reports
    reports_dir: Path
    summary: str  # the closing text the CLI prints (also the run's summary.txt)


def run_pipeline(
    pipeline: str | os.PathLike[str] | Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    artifacts: str | os.PathLike[str] | None = None,
    reports: str | os.PathLike[str] | None = None,
    device: str | None = None,
    force: bool = False,
) -> RunResult:
    """Run a pipeline as ``python -m compress.run`` does and return its results.

    ``pipeline``: a YAML file, or the same content as a dict (relative paths in it are relative
    to the working directory). ``overrides``: ``{"stages.train.epochs": 1}`` or
    ``["train.epochs=1"]``, meaning what ``--set`` means. The other arguments are the CLI's
    ``--data-root``, ``--artifacts``, ``--reports`` (default ``./artifacts``, ``./reports``),
    ``--device`` and ``--force``.

    Raises CompressError (or a subclass) for bad input, StageFailure when a stage crashes and
    GateFailure when a quality gate fails (its ``.result`` is the RunResult).
    """
    if not isinstance(pipeline, Mapping | str | os.PathLike):
        raise TypeError(f"pipeline: give a YAML file path or a dict, not {type(pipeline).__name__}")
    source = pipeline if isinstance(pipeline, Mapping) else Path(pipeline)
    settings = override_texts(overrides)
    with _caller_state_kept():
        summary = _execute(
            source,
            settings,
            data_root=data_root,
            artifacts=Path("artifacts") if artifacts is None else artifacts,
            reports=Path("reports") if reports is None else reports,
            device=device,
            force=force,
        )
        text, failed = cli.closing_text(summary)
        problem = cli.save_summary(summary, text)
        if problem:
            log.warning("%s", problem)
        bundle = _bundle(summary)
        result = RunResult(  # absolute: still right after the caller changes directory
            table=_results_table(summary),
            gates=_gates(summary),
            bundle=None if bundle is None else bundle.absolute(),
            run_dir=summary.run_dir.absolute(),
            reports_dir=summary.reports_dir.absolute(),
            summary=text.lstrip(),
        )
    if failed:
        error = GateFailure(cli.gates_failed_message(summary, failed))
        error.result = result  # the table and the gates that failed, to look at
        raise error
    return result


def override_texts(overrides: Mapping[str, Any] | Iterable[str] | None) -> list[str]:
    """``--set`` texts, so that each override means exactly what it means on the command line:
    a list's ``KEY=VALUE`` strings as they are, a dict's values written as YAML reads them."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [f"{key}={_as_text(value)}" for key, value in overrides.items()]
    return [str(override) for override in overrides]


def _as_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)  # JSON is YAML's flow style: [1, 2], {"a": 1}
    return str(value)


def _execute(source: Path | Mapping[str, Any], overrides: list[str], **options: Any) -> RunSummary:
    """Load and run as the CLI does; its exit codes become exceptions with its messages."""
    try:
        pipeline = cli.load(source, overrides)
        return run_engine(pipeline, cli.run_options(overrides, data_root_from=DATA_ROOT_FROM, **options))
    except CompressError as exc:
        masked = mask_secrets(str(exc))  # as the CLI prints it
        if masked != str(exc):
            exc.args = (masked,)
        raise
    except StageFailed as exc:
        raise StageFailure(exc) from exc.error
    except OSError as exc:  # outside a stage: the run directory, manifest or reports
        storage = StorageError.from_os_error(exc)
        if storage is None:
            raise
        raise storage from exc


@contextlib.contextmanager
def _caller_state_kept() -> Iterator[None]:
    """Give back what a run may change for its process: the root logger's level and handlers
    (run.log raises the level to INFO), the working directory and torch's thread counts."""
    root = logging.getLogger()
    level, handlers = root.level, [(handler, handler.level) for handler in root.handlers]
    cwd = os.getcwd()
    threads, interop = torch.get_num_threads(), torch.get_num_interop_threads()
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = [handler for handler, _ in handlers]
        for handler, handler_level in handlers:
            handler.setLevel(handler_level)
        with contextlib.suppress(OSError):
            if os.getcwd() != cwd:
                os.chdir(cwd)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if torch.get_num_interop_threads() != interop:
            with contextlib.suppress(RuntimeError):  # torch allows setting it once per process
                torch.set_num_interop_threads(interop)


def _results_table(summary: RunSummary) -> pd.DataFrame:
    """The table reports/<pipeline>/results.json holds after this run: the one the last stage
    that made one declared (a benchmark, else a report), read from the run itself, since the
    reports folder may still hold an older run's table when this run made none."""
    for record in reversed(summary.records):
        if record.result.table is not None:
            return pd.DataFrame(ResultsTable.load(record.result.table).rows)
    return pd.DataFrame()


def _gates(summary: RunSummary) -> Gates:
    found = cli.gate_outcomes(summary)
    return Gates(
        by_stage={record.label: outcomes for record, outcomes, _ in found},
        failed=sum(failed for _, _, failed in found),
    )


def _bundle(summary: RunSummary) -> Path | None:
    """The last export stage's deploy folder, by the run directory's link to the stage."""
    for record in reversed(summary.records):
        if record.kind == "export":
            folder = (
                summary.run_dir
                / "stages"
                / record.label
                / str(record.result.metrics.get("deploy_dir", "deploy"))
            )
            return folder if folder.is_dir() else None
    return None
