"""torchvision architectures on an ImageFolder tree through the whole pipeline, with figures.

    python -m compress.benchmarks.imagefolder_models DIR [--models mobilenet_v3_small resnet18 ...]
        [--set KEY=VALUE ...] [--artifacts DIR] [--reports DIR]

runs ``pipelines/imagefolder.yaml`` on the tree ``DIR`` once per model (``--set`` limits apply
to every run, e.g. ``data.limit_train=20000 train.epochs=3``), then prints per model: baseline
test accuracy, the structured-pruned variant's MACs ratio and onnxruntime batch-64 latency ratio
and accuracy drop, the static int8 variants' latency ratio and accuracy drop, the fastest variant
the report recommends within its tolerance, and each stage's wall time; and a JSON summary.
Make a tree of MNIST with ``python -m compress.data.to_imagefolder``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PIPELINE = Path(__file__).resolve().parents[2] / "pipelines" / "imagefolder.yaml"
RUNTIME, BATCH = "onnxruntime", 64


def _row(rows: list[dict[str, Any]], variant: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["variant"] == variant and r["runtime"] == RUNTIME), None)


def summarize(reports: Path, artifacts: Path, name: str) -> dict[str, Any]:
    """The figures of one finished run, read from its results.json, report.json and manifest."""
    rows = json.loads((reports / "results.json").read_text())
    manifest = json.loads((artifacts / "latest" / "manifest.json").read_text())
    base = _row(rows, "baseline") or {}
    out: dict[str, Any] = {
        "model": name,
        "baseline_accuracy": base.get("accuracy"),
        "baseline_b64_ms": base.get(f"latency_b{BATCH}_p50_ms"),
        "stage_seconds": {s["name"]: s["seconds"] for s in manifest["stages"]},
    }
    slim = manifest["variants"].get("slim", {}).get("metrics", {})
    out["slim_macs_ratio"] = slim.get("macs_reduction")
    for variant in ("slim", "baseline.int8-static", "slim.int8-static", "baseline.int8-dynamic"):
        row = _row(rows, variant)
        if row is None:
            continue
        ratio = row.get(f"latency_ratio_b{BATCH}")
        out[variant] = {
            "accuracy": row.get("accuracy"),
            "drop_pp": -row["accuracy_delta_pp"] if row.get("accuracy_delta_pp") is not None else None,
            "latency_b64_ms": row.get(f"latency_b{BATCH}_p50_ms"),
            "speedup_b64": 1 / ratio if ratio else None,
        }
    report = artifacts / "latest" / "stages" / "report" / "result.json"
    if report.is_file():
        recommendations = json.loads(report.read_text())["metrics"].get("recommendations", {})
        out["recommended"] = recommendations
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compress.benchmarks.imagefolder_models", description=__doc__
    )
    parser.add_argument("tree", type=Path, help="the ImageFolder tree (train/, test/)")
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_small", "resnet18", "efficientnet_b0"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    results = []
    for model in args.models:
        artifacts, reports = args.artifacts / model, args.reports / model  # one pipeline, a folder per model
        command = [
            sys.executable, "-m", "compress.run", str(PIPELINE), "--data-root", str(args.tree), "-q",
            "--artifacts", str(artifacts), "--reports", str(reports),
            "--set", f"train.model.torchvision={model}",
            *[item for override in args.overrides for item in ("--set", override)],
        ]  # fmt: skip
        print(f"== {model}: {' '.join(command[2:])}", flush=True)
        done = subprocess.run(command, check=False)
        if done.returncode not in (0, 1):  # 1: a gate failed, the figures are still there
            print(f"{model}: the pipeline failed with exit code {done.returncode}", file=sys.stderr)
            continue
        figures = summarize(reports / PIPELINE.stem, artifacts / PIPELINE.stem, model)
        results.append(figures)
        print(json.dumps(figures, indent=1), flush=True)
    print("imagefolder-models-result: " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
