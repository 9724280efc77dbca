"""The CLI: ``python -m compress.run PIPELINE.yaml [options]``.

Exit codes: 0 ok, 1 a quality gate failed, 2 bad input (config, data, artifacts),
3 a stage failed for another reason (its traceback is in the run's log), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from compress import distributed
from compress.config import load_pipeline, mask_secrets
from compress.engine import RunOptions, RunSummary, StageFailed, run_pipeline
from compress.errors import CompressError, StorageError
from compress.fileio import read_json, write_text
from compress.gating import Outcome, chance, format_table
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
    parser.add_argument("pipeline", type=Path, help="the pipeline YAML file")
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
        help="database for the tune stages' studies (any SQLAlchemy URL, e.g. "
        "postgresql://user@host/db; password via PGPASSWORD or ~/.pgpass); default: an SQLite "
        "file in the stage's directory",
    )
    parser.add_argument(
        "--worker",
        action="store_true",
        help="with --only TUNE_STAGE and a shared --storage: join the study as one of several "
        "worker processes (on one or many machines)",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        pipeline = load_pipeline(args.pipeline, config_registry(), args.overrides)
        if args.storage:
            pipeline = with_storage(pipeline, args.storage, config_registry())
        # a root given on the command line, either way, beats COMPRESS_DATA_ROOT
        set_root = _set_value(args.overrides, "data.root")
        if args.validate:
            print(
                f"ok: {pipeline.path} is valid ({len(pipeline.stages)} stages: "
                f"{', '.join(s.label for s in pipeline.stages)})"
            )
            return 0
        summary = run_pipeline(
            pipeline,
            RunOptions(
                data_root=args.data_root or set_root,
                data_root_from="--data-root" if args.data_root else "--set data.root",
                device=args.device,
                force=args.force,
                from_stage=args.from_stage,
                only_stage=args.only_stage,
                artifacts_dir=args.artifacts,
                reports_dir=args.reports,
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
        print(f"error: {mask_secrets(str(exc))}\n  full traceback: {exc.log_path}", file=sys.stderr)
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
    text = format_summary(summary)
    gates_text, failed_gates = format_gates(summary)
    if not distributed.is_main():  # rank 0 prints and writes the summary
        return EXIT_GATE_FAILED if failed_gates else 0
    text += gates_text + format_chance(summary)
    print(text)
    try:
        write_text(summary.run_dir / "summary.txt", text.lstrip() + "\n")
    except OSError as exc:  # the run itself is complete and recorded; only this copy is missing
        print(f"warning: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
    if failed_gates:
        print(
            f"error: {failed_gates} quality gate(s) failed; see {summary.reports_dir / 'gates.xml'}",
            file=sys.stderr,
        )
        return EXIT_GATE_FAILED
    return 0


def _set_value(overrides: list[str], key: str) -> str | None:
    """The last ``--set KEY=VALUE`` value given for ``key`` (None if not given or null)."""
    for override in reversed(overrides):
        name, _, value = override.partition("=")
        if name.strip() == key:
            return value.strip() if value.strip().lower() not in ("", "null", "none", "~") else None
    return None


def format_gates(summary: RunSummary) -> tuple[str, int]:
    """The pass/fail table of every gates stage in the run, and how many gates failed.

    Read from the stage's result, so a cached gates stage fails the run just the same.
    """
    text, failed = "", 0
    for record in summary.records:
        if record.kind != "gates":
            continue
        outcomes = [Outcome.from_json(entry) for entry in record.result.metrics.get("results", [])]
        failed += int(record.result.metrics.get("failed", 0))
        text += "\n" + format_table(outcomes, title=record.label)
    return text, failed


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
