"""``python -m compress.check``: compare a run's results with a stored reference, for CI.

    python -m compress.check reports/mnist/results.json --baseline reports/baselines/mnist.json \\
        [--max-drop PP] [--max-class-drop PP] [--decide estimate|lower|upper] [--confidence C] \\
        [--max-size-ratio R] [--max-latency-ratio R] [--exclude VARIANT ...] [--junit FILE]
    python -m compress.check reports/mnist/results.json --baseline reports/baselines/mnist.json \\
        --update-baseline [--exclude VARIANT ...]

The current file is a benchmark table (``results.json``: one row per variant and runtime, read
as a ``compress.results.ResultsTable``); its top-1 predictions are read from ``predictions.npz``
beside it when it is there. The reference is one JSON file written by ``--update-baseline``: the
rows plus each row's predictions (see ``compress/gating/reference_file.py``); a bare results
table (an older reference) works too.
Each reference row is compared with the current row of the same variant and runtime:

- accuracy: a drop of more than ``--max-drop`` percentage points fails; with predictions of the
  same test images on both sides the drop gets its paired interval and the flips (images whose
  top-1 changed: fixed, broken) are reported;
- classes: a class whose accuracy drops by more than ``--max-class-drop`` pp fails, naming it
  (an average of 10 classes hides a collapsed one);
- ``--decide`` picks the number of each drop that meets its limit: ``estimate`` (the measured
  drop), ``lower`` (fail only when the interval's lower end exceeds the limit: significantly
  beyond it) or ``upper`` (pass only when the upper end is within it), at ``--confidence``;
- size: current bytes / reference bytes above ``--max-size-ratio`` fails;
- latency (median, every batch size both files timed): current / reference above
  ``--max-latency-ratio`` fails, compared only when both rows come from the same CPU model
  and thread count; otherwise the check says so and skips latency.

A row missing from the current file fails; a new row is reported, not failed. A reference
measured on other test images (another test_count, label vector or data fingerprint) is
compared as numbers only, and the check says so. ``--update-baseline`` writes the reference
from the current file instead (atomically), keeping only the columns the check reads so the
committed file stays small and diffable; ``--exclude`` leaves variants out of both.

Exit codes: 0 no regression, 1 regression, 2 bad input (missing file, not JSON, wrong shape,
a bad flag value).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from compress import gating
from compress.errors import CompressError
from compress.fileio import write_bytes, write_json
from compress.gating import reference_file
from compress.gating.comparison import Comparison, compare_runs
from compress.gating.numbers import confidence_text
from compress.gating.outcome import DECIDE_MODES
from compress.gating.pairing import matches
from compress.measure.paired import DEFAULT_CONFIDENCE
from compress.results import (
    PREDICTIONS_FILE,
    REFERENCE_COLUMNS,
    Predictions,
    ResultsTable,
    predictions_beside,
)

EXIT_REGRESSION = 1
EXIT_BAD_INPUT = 2
MAX_FILE_BYTES = 50_000_000


class BadInput(CompressError):
    """A results file that is missing, unreadable or not a benchmark table."""


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line on stderr and exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m compress.check",
        description="Compare a benchmark results.json with a stored reference; exit 1 on regressions.",
        epilog="Exit codes: 0 no regression, 1 regression, 2 bad input.",
    )
    parser.add_argument("current", type=Path, help="results.json of the run to check")
    parser.add_argument(
        "--baseline", type=Path, required=True, metavar="REFERENCE", help="the reference results file"
    )
    defaults = gating.Thresholds()
    flags = (
        ("--max-drop", _non_negative, defaults.max_drop, "PP",
         "largest allowed accuracy drop in percentage points"),
        ("--max-class-drop", _non_negative, defaults.max_class_drop, "PP",
         "largest allowed drop of any one class's accuracy, in percentage points"),
        ("--decide", _decide, defaults.decide, "MODE",
         "which number of a drop meets its limit: estimate (the measured drop), lower (fail only when "
         "the interval's lower end exceeds the limit) or upper (pass only when its upper end is within it)"),
        ("--confidence", _confidence, DEFAULT_CONFIDENCE, "C",
         "confidence of the paired intervals, in (0, 1)"),
        ("--max-size-ratio", _positive, defaults.max_size_ratio, "R",
         "largest allowed current/reference file size"),
        ("--max-latency-ratio", _positive, defaults.max_latency_ratio, "R",
         "largest allowed current/reference median latency, same CPU and threads only"),
    )  # fmt: skip
    for flag, kind, default, metavar, text in flags:
        parser.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default {default})"
        )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="VARIANT",
        help="leave this variant out of the comparison and of a written reference (repeatable)",
    )
    parser.add_argument("--junit", type=Path, metavar="FILE", help="also write the comparison as JUnit XML")
    parser.add_argument(
        "--update-baseline",
        action="store_true",
        help="write the reference file from CURRENT (and the predictions.npz beside it) instead of "
        "comparing (for committing)",
    )
    return parser


def _non_negative(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _confidence(text: str) -> float:
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (e.g. 0.95), got {text}")
    return value


def _decide(text: str) -> str:
    if text not in DECIDE_MODES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DECIDE_MODES)}, got {text!r}")
    return text


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def load_table(path: Path, role: str) -> ResultsTable:
    """A benchmark table (a results.json, or a reference file) with the predictions the file
    carries (a reference written with them); BadInput with a one-line reason otherwise."""
    if not path.exists():
        hint = "; create it with --update-baseline" if role == "reference" else ""
        raise BadInput(f"{path}: {role} results file not found{hint}")
    if not path.is_file():
        raise BadInput(f"{path}: {role} results path is not a file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise BadInput(f"{path}: larger than {MAX_FILE_BYTES} bytes; is this a results.json?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read the {role} results file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    try:
        data, found = reference_file.read(data)
        return ResultsTable.from_json(data, found)
    except ValueError as exc:  # TableError too: the one-line reason, after the file's name
        raise BadInput(f"{path}: {exc}") from None


def current_predictions(path: Path) -> Predictions | None:
    """The predictions.npz beside a results.json; None when there is none."""
    try:
        return predictions_beside(path)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def reference_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The columns the check reads (plus identification), sorted: what gets committed."""
    kept = []
    for row in rows:
        keep = {k: row[k] for k in REFERENCE_COLUMNS if k in row}
        for key in sorted(row):
            if key.startswith("latency_b") and (key.endswith("_p50_ms") or key.endswith("_p95_ms")):
                keep[key] = row[key]
        kept.append(keep)
    return sorted(kept, key=lambda r: (r["variant"], r["runtime"]))


def update_baseline(args: argparse.Namespace, current: ResultsTable) -> int:
    """Write the reference from the current rows and their predictions; 0 when written."""
    rows, found = reference_rows(current.without(args.exclude)), current.predictions
    if found is not None:
        if any(gating.number(r.get("test_count")) not in (None, len(found.labels)) for r in rows):
            raise BadInput(
                f"{args.current}: its predictions hold {len(found.labels)} images, its rows do not"
            )
        stale = [
            f"{r['variant']} [{r['runtime']}]"
            for r in rows
            if (values := found.get(r["variant"], r["runtime"])) is not None
            and not matches(values, found.labels, r)
        ]
        if stale:
            raise BadInput(
                f"{args.current.parent / PREDICTIONS_FILE}: predictions disagree with the accuracy of "
                f"{', '.join(stale)}; is it from another run?"
            )
    try:
        write_json(args.baseline, reference_file.build(rows, found))
    except OSError as exc:
        raise BadInput(f"{args.baseline}: cannot write the reference ({exc.strerror})") from None
    stored = 0 if found is None else sum(found.get(r["variant"], r["runtime"]) is not None for r in rows)
    extra = (
        f", with the predictions of {stored} row(s) on {len(found.labels)} test images"
        if found is not None
        else f"; no {PREDICTIONS_FILE} beside it, so the reference holds no predictions"
    )
    print(f"wrote {args.baseline}: {len(rows)} rows from {args.current}{extra}")
    return 0


def limits_text(limits: gating.Thresholds) -> str:
    decided = "on the estimates"
    if limits.decide != "estimate":
        decided = f"on the {limits.decide} end of the {confidence_text(limits.confidence)} CI"
    return (
        f"max drop {limits.max_drop:g} pp, max class drop {limits.max_class_drop:g} pp, decided {decided}, "
        f"max size ratio {limits.max_size_ratio:g}, max latency ratio {limits.max_latency_ratio:g}"
    )


def run_check(args: argparse.Namespace) -> tuple[Comparison, gating.Thresholds]:
    """Load both files (BadInput on a bad one) and compare them; the --exclude'd variants are left out."""
    current = _with_predictions(load_table(args.current, "current"), args.current)
    reference = load_table(args.baseline, "reference")
    limits = gating.Thresholds(
        args.max_drop,
        args.max_size_ratio,
        args.max_latency_ratio,
        args.max_class_drop,
        args.decide,
        args.confidence,
    )
    compared = compare_runs(
        current.without(args.exclude),
        reference.without(args.exclude),
        limits,
        current.predictions,
        reference.predictions,
    )
    return compared, limits


def _with_predictions(table: ResultsTable, path: Path) -> ResultsTable:
    """The current table with its predictions: those its file carries, else the predictions.npz
    beside it."""
    if table.predictions is None:
        table.predictions = current_predictions(path)
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.update_baseline:
            return update_baseline(args, _with_predictions(load_table(args.current, "current"), args.current))
        result, limits = run_check(args)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{args.current} against {args.baseline}")
    print(gating.format_table(result.outcomes, title="check"))
    for note in result.notes:
        print(f"note: {note}")
    tally = gating.counts(result.outcomes)
    if args.junit is not None:
        properties = {"current": args.current, "reference": args.baseline, **vars(limits)}
        properties.update({f"note_{i}": note for i, note in enumerate(result.notes, 1)})
        try:
            write_bytes(args.junit, gating.junit_xml(result.outcomes, "compress.check", properties))
        except OSError as exc:
            print(f"error: cannot write {args.junit} ({exc.strerror})", file=sys.stderr)
            return EXIT_BAD_INPUT
    if tally[gating.FAILED]:
        print(f"FAILED: {tally[gating.FAILED]} regression(s) beyond the thresholds ({limits_text(limits)})")
        return EXIT_REGRESSION
    print(f"ok: no regression beyond the thresholds ({limits_text(limits)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
