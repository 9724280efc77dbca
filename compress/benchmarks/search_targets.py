"""How far a run's shipped variants go, in the terms of the recipe search's targets.

    python -m compress.benchmarks.search_targets reports/mnist/results.json [--within 0.3]

Reads a run's results table (``results.json`` under ``reports/<pipeline>/``) and prints, for each
variant that onnxruntime runs within ``--within`` pp of the baseline's test accuracy: how many
times smaller its file is, gzip bytes against the raw bytes of the fp32 baseline's ONNX file,
and how many times faster it is at batch 64 in onnxruntime (1 thread, timed interleaved by the
benchmark stage). Then the smallest and the fastest of them, the figures the search's targets
name (docs/stages/search.md, "Measured on MNIST").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress.results import ResultsTable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.benchmarks.search_targets", description=__doc__)
    parser.add_argument("results", type=Path, help="a run's results.json")
    parser.add_argument("--within", type=float, default=0.3, help="largest test-accuracy drop, in pp")
    parser.add_argument("--batch", type=int, default=64, help="the timed batch size")
    args = parser.parse_args(argv)
    rows = [r for r in ResultsTable.load(args.results).rows if r.get("runtime") == "onnxruntime"]
    base = next((r for r in rows if r.get("is_baseline")), None)
    if base is None:
        print(f"error: {args.results}: no baseline row in onnxruntime", file=sys.stderr)
        return 2
    latency = f"latency_b{args.batch}_p50_ms"
    print(f"baseline: {base['accuracy']:.4f} test accuracy, {base['size_bytes']:,} bytes, "
          f"{base[latency]:.3f} ms at batch {args.batch}")  # fmt: skip
    print(f"\n| variant | test acc. | drop (pp) | gzip bytes | x smaller | ms b{args.batch} | x faster |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    kept = []
    for r in rows:
        drop = 100 * (base["accuracy"] - r["accuracy"])
        smaller, faster = base["size_bytes"] / r["gzip_bytes"], base[latency] / r[latency]
        mark = "" if drop <= args.within + 1e-9 else " (outside)"
        print(f"| {r['variant']}{mark} | {r['accuracy']:.4f} | {drop:+.2f} | {r['gzip_bytes']:,} | "
              f"{smaller:.1f} | {r[latency]:.3f} | {faster:.2f} |")  # fmt: skip
        if not mark and not r.get("is_baseline"):
            kept.append((r, smaller, faster))
    if kept:
        small = max(kept, key=lambda k: k[1])
        fast = max(kept, key=lambda k: k[2])
        print(f"\nsmallest within {args.within} pp: {small[0]['variant']} {small[1]:.1f}x smaller")
        name, times = fast[0]["variant"], fast[2]
        print(f"fastest within {args.within} pp: {name} {times:.2f}x faster at batch {args.batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
