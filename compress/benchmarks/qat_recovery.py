"""Does quantization-aware training recover what post-training quantization loses? Over seeds.

    python -m compress.benchmarks.qat_recovery [--pipeline pipelines/mnist-qat.yaml] [--seeds 0 1 2]
        [--stage quantize-w2] [--set KEY=VALUE ...] [--artifacts DIR] [--reports DIR]

runs the pipeline once per seed (``--set seed=N``: the baseline is retrained too), then prints per
seed the fp32 parent's test accuracy, static PTQ's and QAT's test accuracy and drop (both made by
the ``auto`` stage, the same quantizer with and without training), whether each is within the
stage's tolerance, which one shipped, QAT's training seconds and onnxruntime's int8 kernels; then
the mean and standard deviation of both drops, and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

PIPELINE = Path(__file__).resolve().parents[2] / "pipelines" / "mnist-qat.yaml"


def figures(artifacts: Path, pipeline: str, stage: str) -> list[dict[str, Any]]:
    """One row per variant the ``auto``/``qat`` stage made, from its quantize.json."""
    record = json.loads((artifacts / pipeline / "latest" / "stages" / stage / "quantize.json").read_text())
    rows = []
    for name, variant in record["variants"].items():
        m = variant["metrics"]
        tries = {t["method"]: t for t in variant["accuracy_tries"]}
        parent = m["parent_test_accuracy"]

        def drop(method: str, tries: dict = tries, parent: float = parent) -> float | None:
            acc = tries.get(method, {}).get("test_accuracy")
            return round((parent - acc) * 100, 2) if acc is not None else None

        rows.append(
            {
                "variant": name,
                "parent_test": parent,
                "ptq_test": tries.get("ptq", {}).get("test_accuracy"),
                "ptq_drop_pp": drop("ptq"),
                "qat_test": tries.get("qat", {}).get("test_accuracy"),
                "qat_drop_pp": drop("qat"),
                "tolerance_pp": m["tolerance_pp"],
                "shipped": m["quantization_method"],
                "qat_seconds": (m.get("qat") or {}).get("seconds"),
                "int8_kernels": m["int8_kernels"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.benchmarks.qat_recovery", description=__doc__)
    parser.add_argument("--pipeline", type=Path, default=PIPELINE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage", default="quantize-w2", help="the quantize stage with mode auto or qat")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/qat-recovery"))
    parser.add_argument("--reports", type=Path, default=Path("reports/qat-recovery"))
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        artifacts, reports = args.artifacts / f"seed{seed}", args.reports / f"seed{seed}"
        command = [
            sys.executable, "-m", "compress.run", str(args.pipeline), "-q", "--set", f"seed={seed}",
            "--artifacts", str(artifacts), "--reports", str(reports),
            *[item for override in args.overrides for item in ("--set", override)],
        ]  # fmt: skip
        print(f"== seed {seed}: {' '.join(command[2:])}", flush=True)
        done = subprocess.run(command, check=False)
        if done.returncode not in (0, 1):  # 1: a gate failed, the figures are still there
            print(f"seed {seed}: the pipeline failed with exit code {done.returncode}", file=sys.stderr)
            continue
        for row in figures(artifacts, args.pipeline.stem, args.stage):
            rows.append({"seed": seed, **row})
            tol = row["tolerance_pp"]
            print(
                f"seed {seed} {row['variant']}: fp32 {100 * row['parent_test']:.2f} %, "
                f"PTQ {100 * row['ptq_test']:.2f} % (-{row['ptq_drop_pp']:.2f} pp, "
                f"{'within' if row['ptq_drop_pp'] <= tol else 'misses'} {tol} pp), "
                + (
                    f"QAT {100 * row['qat_test']:.2f} % (-{row['qat_drop_pp']:.2f} pp, "
                    f"{'within' if row['qat_drop_pp'] <= tol else 'misses'}, {row['qat_seconds']:.0f} s), "
                    if row["qat_test"] is not None
                    else "QAT not needed, "
                )
                + f"shipped {row['shipped'].upper()}, int8 kernels {row['int8_kernels']}",
                flush=True,
            )
    for key in ("ptq_drop_pp", "qat_drop_pp"):
        values = [r[key] for r in rows if r[key] is not None]
        if len(values) > 1:
            print(
                f"{key}: mean {statistics.mean(values):.2f}, std {statistics.stdev(values):.2f} "
                f"over {len(values)} runs"
            )
    print("qat-recovery-result: " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
