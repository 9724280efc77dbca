"""The CLI: ``python -m compress.run PIPELINE.yaml [options]``.

Exit codes: 0 ok, 1 a quality gate failed, 2 bad input (config, data, artifacts),
3 a stage failed for another reason (its traceback is in the run's log), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compress import distributed
from compress.config import Pipeline, load_pipeline, mask_secrets
from compress.config.loader import load_pipeline_dict
from compress.config.schema import pipeline_schema
from compress.engine import RunOptions, RunSummary, StageFailed, StageRecord, run_pipeline
from compress.errors import CompressError, StorageError
from compress.fileio import read_json, write_text
from compress.gating import Outcome, chance, format_table
from compress.reference import schema_text
from compress.stages import config_registry
from compress.tuning import with_storage

EXIT_GATE_FAILED = 1
EXIT_STAGE_FAILED = 3
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compress.run",
        description="Run a compression pipeline described in YAML.",
        epilog="Exit codes: 0 ok, 1 gate failed, 2 bad input, 3 stage failed, 130 interrupted.",
    )
    parser.add_argument("pipeline", type=Path, nargs="?", help="the pipeline YAML file")
    parser.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON Schema of a pipeline file (what editors complete against) and exit",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a YAML value, e.g. data.limit_train=2000 or train.epochs=1 (repeatable)",
    )
    parser.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        help="re-run this stage and every stage after it, ignoring their cache",
    )
    parser.add_argument(
        "--only",
        dest="only_stage",
        metavar="STAGE",
        help="run only this stage, taking its inputs from the cache",
    )
    parser.add_argument("--force", action="store_true", help="ignore the cache and re-run all stages")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where to train and evaluate (default: the YAML's, else auto)",
    )
    parser.add_argument(
        "--data-root", metavar="DIR", help="dataset folder (beats COMPRESS_DATA_ROOT and data.root)"
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path("artifacts"),
        metavar="DIR",
        help="where run directories and the cache go (default: ./artifacts)",
    )
    parser.add_argument(
        "--reports",
        type=Path,
        default=Path("reports"),
        metavar="DIR",
        help="where reports go (default: ./reports)",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="check the pipeline file and exit without touching data or models",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="database for the tune and search stages' studies (any SQLAlchemy URL, e.g. "
        "postgresql://user@host/db; password via PGPASSWORD or ~/.pgpass); default: an SQLite "
        "file in the stage's directory",
    )
    parser.add_argument(
        "--worker",
        action="store_true",
        help="with --only STAGE (a tune or search stage) and a shared --storage: join its study as "
        "one of several worker processes (on one or many machines)",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.schema:
        print(schema_text(pipeline_schema(config_registry())), end="")
        return 0
    if args.pipeline is None:
        parser.error("the pipeline YAML file is required (or --schema)")
    # Under torchrun: join the process group for the run (see compress.distributed). --worker
    # processes share a study, not a model, so each stays a process of its own.
    with distributed.session(enabled=not (args.validate or args.worker)):
        if not distributed.is_main():
            args.quiet = True  # rank 0 reports; the other ranks print only warnings and errors
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.quiet:  # the console shows warnings only; run.log still gets every INFO line
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.WARNING)
    try:
        pipeline = load(args.pipeline, args.overrides, args.storage)
        if args.validate:
            print(
                f"ok: {pipeline.path} is valid ({len(pipeline.stages)} stages: "
                f"{', '.join(s.label for s in pipeline.stages)})"
            )
            return 0
        summary = run_pipeline(
            pipeline,
            run_options(
                args.overrides,
                data_root=args.data_root,
                device=args.device,
                force=args.force,
                from_stage=args.from_stage,
                only_stage=args.only_stage,
                artifacts=args.artifacts,
                reports=args.reports,
                worker=args.worker,
            ),
        )
    except CompressError as exc:
        if args.debug:
            raise
        print(f"error: {mask_secrets(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except StageFailed as exc:
        if args.debug:
            raise
        print(f"error: {stage_failed_message(exc)}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    except OSError as exc:  # outside a stage: the run directory, manifest or reports
        storage = StorageError.from_os_error(exc)
        if storage is None or args.debug:
            raise
        print(f"error: {storage}", file=sys.stderr)
        return storage.exit_code
    except KeyboardInterrupt:
        command = shlex.join(["python", "-m", "compress.run", *(sys.argv[1:] if argv is None else argv)])
        print(
            "\ninterrupted. Finished stages are cached and training resumes from its last "
            f"checkpoint; to continue, run the same command again:\n  {mask_secrets(command)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if not distributed.is_main():  # rank 0 prints and writes the summary
        return EXIT_GATE_FAILED if format_gates(summary)[1] else 0
    text, failed_gates = closing_text(summary)
    print(text)
    problem = save_summary(summary, text)
    if problem:
        print(problem, file=sys.stderr)
    if failed_gates:
        print(f"error: {gates_failed_message(summary, failed_gates)}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


# The steps below are shared with ``compress.run_pipeline`` (compress/api.py), so that a run
# started from Python loads, runs and sums up exactly as the CLI does.


def load(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = (), storage: str | None = None
) -> Pipeline:
    """The validated pipeline from a YAML file, or from a dict built in Python: one path through
    overrides and validation, so both give the same messages."""
    if isinstance(source, Mapping):
        pipeline = load_pipeline_dict(source, config_registry(), overrides)
    else:
        pipeline = load_pipeline(source, config_registry(), overrides)
    if storage:
        pipeline = with_storage(pipeline, storage, config_registry())
    return pipeline


def run_options(
    overrides: Sequence[str],
    *,
    data_root: str | Path | None = None,
    data_root_from: tuple[str, str] = ("--data-root", "--set data.root"),
    device: str | None = None,
    force: bool = False,
    from_stage: str | None = None,
    only_stage: str | None = None,
    artifacts: str | Path = Path("artifacts"),
    reports: str | Path = Path("reports"),
    worker: bool = False,
) -> RunOptions:
    """The engine's options. A data root the caller gives, either way (``data_root`` or a
    ``data.root`` override), beats COMPRESS_DATA_ROOT; ``data_root_from`` names those two ways
    in messages (the CLI's flags, or the Python call's arguments)."""
    set_root = _set_value(overrides, "data.root")
    return RunOptions(
        data_root=str(data_root) if data_root else set_root,
        data_root_from=data_root_from[0] if data_root else data_root_from[1],
        device=device,
        force=force,
        from_stage=from_stage,
        only_stage=only_stage,
        artifacts_dir=Path(artifacts),
        reports_dir=Path(reports),
        worker=worker,
    )


def closing_text(summary: RunSummary) -> tuple[str, int]:
    """What the run prints when done (stages, variants, gates, chance) and how many gates failed."""
    text = format_summary(summary)
    gates_text, failed_gates = format_gates(summary)
    return text + gates_text + format_chance(summary), failed_gates


def save_summary(summary: RunSummary, text: str) -> str | None:
    """Keep the closing text as the run's summary.txt; a warning line if it cannot be written
    (the run itself is complete and recorded; only this copy is missing)."""
    try:
        write_text(summary.run_dir / "summary.txt", text.lstrip() + "\n")
    except OSError as exc:
        return f"warning: cannot write {exc.filename}: {exc.strerror}"
    return None


def gates_failed_message(summary: RunSummary, failed_gates: int) -> str:
    return f"{failed_gates} quality gate(s) failed; see {summary.reports_dir / 'gates.xml'}"


def stage_failed_message(exc: StageFailed) -> str:
    """The stage, what it raised, and where its full traceback is."""
    return f"{mask_secrets(str(exc))}\n  full traceback: {exc.log_path}"


def _set_value(overrides: list[str], key: str) -> str | None:
    """The last ``--set KEY=VALUE`` value given for ``key`` (None if not given or null)."""
    for override in reversed(overrides):
        name, _, value = override.partition("=")
        if name.strip() == key:
            return value.strip() if value.strip().lower() not in ("", "null", "none", "~") else None
    return None


def format_gates(summary: RunSummary) -> tuple[str, int]:
    """Each gates stage of the run in brief, and how many gates failed: one count line
    (``gates: 31 passed, 1 failed, 0 skipped``), then only the failed gates (one line each, with
    the measured value and the threshold) and the skipped ones (one line per gate and reason).
    Every outcome, passed ones included, is in the stage's gates.json and gates.xml.

    Read from the stage's result, so a cached gates stage fails the run just the same.
    """
    text, failed = "", 0
    for record, outcomes, record_failed in gate_outcomes(summary):
        failed += record_failed
        text += "\n" + format_table(outcomes, title=record.label, list_passed=False)
    return text, failed


def gate_outcomes(summary: RunSummary) -> list[tuple[StageRecord, list[Outcome], int]]:
    """Each gates stage of the run, its outcomes and how many of them failed (from its result)."""
    found = []
    for record in summary.records:
        if record.kind == "gates":
            metrics = record.result.metrics
            outcomes = [Outcome.from_json(entry) for entry in metrics.get("results", [])]
            found.append((record, outcomes, int(metrics.get("failed", 0))))
    return found


def chance_findings(summary: RunSummary) -> list[chance.AtChance]:
    """The variants at chance: by the last benchmark's table, else by each variant's own test
    accuracy, and by the training losses of the stages that trained them."""
    rows: list[dict] = []
    for record in summary.records:
        path = record.directory / "results.json"
        if record.kind == "benchmark" and path.is_file():
            try:
                table = read_json(path)
            except (OSError, ValueError):
                continue  # the run finished; a missing table only leaves this check to the variants
            rows = [r for r in table if isinstance(r, dict)] if isinstance(table, list) else []
    measured = {r.get("variant") for r in rows}
    for variant in summary.variants.values():
        if variant.name not in measured:
            own = variant.metrics.get("per_class_accuracy")
            rows.append(
                {
                    "variant": variant.name,
                    "runtime": "own stage",
                    "accuracy": variant.metrics.get("test_accuracy"),
                }
                | ({"per_class_accuracy": own} if own else {})
            )
    made = [(r.kind, r.result.metrics, [v.name for v in r.result.variants]) for r in summary.records]
    classes = chance.find_num_classes(rows, summary.variants.values())
    return chance.at_chance(rows, chance.trained_histories(made), classes)


def format_chance(summary: RunSummary) -> str:
    """The closing summary's last word when a variant learned nothing ('' when none did).

    Without a ``min_above_chance_pp`` gate this is a warning, never an exit code.
    """
    text = chance.warning(chance_findings(summary))
    return f"\nWARNING: {text}" if text else ""


def format_summary(summary: RunSummary) -> str:
    lines = [f"\n{summary.pipeline} run {summary.run_id}"]
    for record in summary.records:
        made = f" -> {', '.join(record.outputs)}" if record.outputs else ""
        lines.append(f"  {record.label:<16} {record.status:<7} {record.seconds:7.1f}s{made}")
    if summary.variants:
        lines.append("  variants:")
        for variant in summary.variants.values():
            acc = variant.metrics.get("test_accuracy")
            shown = f"{100 * acc:.2f}%" if isinstance(acc, float) else "n/a"
            lines.append(f"    {variant.name:<28} test accuracy {shown}")
    ran = sum(r.status == "ran" for r in summary.records)
    cached = len(summary.records) - ran
    lines.append(f"  run directory: {summary.run_dir}")
    if summary.reports_dir.exists():
        lines.append(f"  reports: {summary.reports_dir}")
    lines.append(
        f"done: {len(summary.records)} stages ({ran} ran, {cached} cached), "
        f"{len(summary.variants)} variants in {summary.seconds:.1f}s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
