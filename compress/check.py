"""``python -m compress.check``: compare a run's results with a stored reference, for CI.

    python -m compress.check reports/mnist/results.json --baseline reports/baselines/mnist.json \\
        [--max-drop PP] [--max-size-ratio R] [--max-latency-ratio R] [--junit FILE]
    python -m compress.check reports/mnist/results.json --baseline reports/baselines/mnist.json \\
        --update-baseline

Both files are benchmark tables (``results.json``: one row per variant and runtime). Each
reference row is compared with the current row of the same variant and runtime:

- accuracy: a drop of more than ``--max-drop`` percentage points fails;
- size: current bytes / reference bytes above ``--max-size-ratio`` fails;
- latency (median, every batch size both files timed): current / reference above
  ``--max-latency-ratio`` fails, compared only when both rows come from the same CPU model
  and thread count; otherwise the check says so and skips latency.

A row missing from the current file fails; a new row is reported, not failed.
``--update-baseline`` writes the reference from the current file instead (atomically), keeping
only the columns the check reads so the committed file stays small and diffable.

Exit codes: 0 no regression, 1 regression, 2 bad input (missing file, not JSON, wrong shape).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from compress import gating
from compress.errors import CompressError
from compress.fileio import write_bytes, write_json

EXIT_REGRESSION = 1
EXIT_BAD_INPUT = 2
MAX_FILE_BYTES = 50_000_000
KEPT_COLUMNS = (
    "variant",
    "runtime",
    "format",
    "parent",
    "status",
    "error",
    "accuracy",
    "accuracy_delta_pp",
    "correct",
    "test_count",
    "size_bytes",
    "gzip_bytes",
    "size_ratio",
    "gzip_ratio",
    "parameters",
    "nonzero_parameters",
    "sparsity",
    "macs",
    "threads",
    "cpu_model",
    "torch_version",
    "onnxruntime_version",
    "export_ok",
)


class BadInput(CompressError):
    """A results file that is missing, unreadable or not a benchmark table."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compress.check",
        description="Compare a benchmark results.json with a stored reference; exit 1 on regressions.",
        epilog="Exit codes: 0 no regression, 1 regression, 2 bad input.",
    )
    parser.add_argument("current", type=Path, help="results.json of the run to check")
    parser.add_argument(
        "--baseline", type=Path, required=True, metavar="REFERENCE", help="the reference results file"
    )
    defaults = gating.Thresholds()
    parser.add_argument(
        "--max-drop",
        type=_non_negative,
        default=defaults.max_drop,
        metavar="PP",
        help=f"largest allowed accuracy drop in percentage points (default {defaults.max_drop})",
    )
    parser.add_argument(
        "--max-size-ratio",
        type=_positive,
        default=defaults.max_size_ratio,
        metavar="R",
        help=f"largest allowed current/reference file size (default {defaults.max_size_ratio})",
    )
    parser.add_argument(
        "--max-latency-ratio",
        type=_positive,
        default=defaults.max_latency_ratio,
        metavar="R",
        help=f"largest allowed current/reference median latency, same CPU and threads only "
        f"(default {defaults.max_latency_ratio})",
    )
    parser.add_argument("--junit", type=Path, metavar="FILE", help="also write the comparison as JUnit XML")
    parser.add_argument(
        "--update-baseline",
        action="store_true",
        help="write the reference file from CURRENT instead of comparing (for committing)",
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


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def load_rows(path: Path, role: str) -> list[dict[str, Any]]:
    """A benchmark table from ``path``; BadInput with a one-line reason otherwise."""
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
    if not isinstance(data, list):
        raise BadInput(
            f"{path}: expected a benchmark results table (a JSON list of rows), got a JSON {_kind(data)}"
        )
    seen: set[tuple[str, str]] = set()
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise BadInput(f"{path}: row {index} is a JSON {_kind(row)}, not an object")
        for key in ("variant", "runtime"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise BadInput(f"{path}: row {index} has no {key!r} name; is this a benchmark results.json?")
        for key in ("accuracy", "size_bytes"):
            if row.get(key) is not None and gating.number(row[key]) is None:
                raise BadInput(f"{path}: row {index} ({row['variant']}): {key} is not a number: {row[key]!r}")
        pair = (row["variant"], row["runtime"])
        if pair in seen:
            raise BadInput(f"{path}: {pair[0]} [{pair[1]}] appears twice")
        seen.add(pair)
    return data


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), "number")


def reference_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The columns the check reads (plus identification), sorted: what gets committed."""
    kept = []
    for row in rows:
        keep = {k: row[k] for k in KEPT_COLUMNS if k in row}
        for key in sorted(row):
            if key.startswith("latency_b") and (key.endswith("_p50_ms") or key.endswith("_p95_ms")):
                keep[key] = row[key]
        kept.append(keep)
    return sorted(kept, key=lambda r: (r["variant"], r["runtime"]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        current = load_rows(args.current, "current")
        if args.update_baseline:
            rows = reference_rows(current)
            try:
                write_json(args.baseline, rows)
            except OSError as exc:
                raise BadInput(f"{args.baseline}: cannot write the reference ({exc.strerror})") from None
            print(f"wrote {args.baseline}: {len(rows)} rows from {args.current}")
            return 0
        reference = load_rows(args.baseline, "reference")
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    limits = gating.Thresholds(args.max_drop, args.max_size_ratio, args.max_latency_ratio)
    outcomes, notes = gating.compare(current, reference, limits)
    print(f"{args.current} against {args.baseline}")
    print(gating.format_table(outcomes, title="check"))
    for note in notes:
        print(f"note: {note}")
    tally = gating.counts(outcomes)
    if args.junit is not None:
        properties = {"current": args.current, "reference": args.baseline, **vars(limits)}
        try:
            write_bytes(args.junit, gating.junit_xml(outcomes, "compress.check", properties))
        except OSError as exc:
            print(f"error: cannot write {args.junit} ({exc.strerror})", file=sys.stderr)
            return EXIT_BAD_INPUT
    limits_text = (
        f"max drop {limits.max_drop:g} pp, max size ratio {limits.max_size_ratio:g}, "
        f"max latency ratio {limits.max_latency_ratio:g}"
    )
    if tally[gating.FAILED]:
        print(f"FAILED: {tally[gating.FAILED]} regression(s) beyond the thresholds ({limits_text})")
        return EXIT_REGRESSION
    print(f"ok: no regression beyond the thresholds ({limits_text})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
