"""``python -m compress.verify DEPLOY_DIR``: the command that checks a deploy bundle.

The checks themselves (checksums, then every model file in its own runtime, in a fresh process)
are in ``compress.ship.verify``; this module parses the command line, prints the per-file table
and the one-line verdict, and returns the exit code: 0 everything matches; 1 a check failed;
2 the folder is not a deploy bundle, or a model whose checksum matches cannot be loaded at all.

Standard library only (through ``compress.ship.verify``), so it starts fast without torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress.ship.targets.registry import TARGETS
from compress.ship.verify import CHILD_TIMEOUT_S, EXIT_BAD_INPUT, EXIT_OK, SUMS, NotABundle, Row, verify


def format_table(rows: list[Row]) -> str:
    width = max([len(r.file) for r in rows] + [4])
    lines = [f"{'file':<{width}}  {'sha256':<8}  {'outputs':<8}  {'max|diff|':>9}  {'top-1':>7}  detail"]
    for r in rows:
        diff = f"{r.max_abs_diff:.2e}" if r.max_abs_diff is not None else "-"
        lines.append(
            f"{r.file:<{width}}  {r.checksum:<8}  {r.outputs:<8}  {diff:>9}  {r.top1 or '-':>7}  {r.detail}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compress.verify",
        description="Check a deploy bundle: checksums, then each model file in a fresh process that "
        "has only numpy and that file's runtime (onnxruntime, OpenVINO, LiteRT, ExecuTorch).",
        epilog="Exit codes: 0 all match, 1 a file failed (see the table), 2 not a deploy bundle.",
    )
    parser.add_argument("deploy_dir", type=Path, help="the deploy folder (…/stages/export/deploy)")
    parser.add_argument(
        "--timeout", type=float, default=CHILD_TIMEOUT_S, help="seconds allowed per model (default 300)"
    )
    parser.add_argument(
        "--targets",
        type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
        default=None,
        help=f"comma-separated runtimes to check (default: all listed; known: {', '.join(TARGETS)})",
    )
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets or [] if t not in TARGETS]
    if unknown:
        print(f"error: --targets: unknown {', '.join(unknown)}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        code, rows, messages = verify(args.deploy_dir, args.timeout, args.targets)
    except NotABundle as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(rows))
    for message in messages:
        print(message)
    models = sum(r.outputs not in ("-", "SKIPPED") for r in rows)
    if code == EXIT_OK:
        print(f"verify: OK: {len(rows)} files match {SUMS}, {models} models reproduce their expected outputs")
    else:
        bad = ", ".join(r.file for r in rows if not r.ok) or SUMS
        print(f"verify: FAILED: {bad}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
