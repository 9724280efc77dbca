"""How should structured pruning choose per-layer amounts for a MACs target? Measured over seeds.

    python -m compress.benchmarks.slim_scopes [--dataset mnist] [--seeds 0 1 2] [--target 2.0]
        [--scopes uniform global macs] [--epochs 3] [--finetune-epochs 2] [--artifacts DIR]

For each seed (the baseline is trained anew, so every seed prunes other weights) it runs one
pipeline: LeNet-5, then one ``prune`` stage per scope with the same ``target_macs_reduction``
and fine-tuning, ONNX export and onnxruntime timing at batch 64. It prints per seed and scope
the MACs reduction reached, test accuracy before and after fine-tuning, the layer shapes, and
the onnxruntime batch-64 latency against the baseline's; then a JSON line. A scope that cannot
reach the target fails the stage, which the table shows as ``unreachable``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def pipeline(args: argparse.Namespace) -> dict[str, Any]:
    finetune = {
        "epochs": args.finetune_epochs,
        "optimizer": {"name": "sgd", "lr": 0.02, "weight_decay": 0.00005},
        "schedule": "cosine",
    }
    prunes = [
        {
            "stage": "prune",
            "name": f"slim-{scope}",
            "method": "structured",
            "target_macs_reduction": args.target,
            "scope": scope,
            "output": f"slim_{scope}",
            "finetune": finetune,
        }
        for scope in args.scopes
    ]
    return {
        "name": "slim-scopes",
        "seed": 0,
        "data": {"dataset": args.dataset, "val_size": 5000, "batch_size": 128},
        "stages": [
            {
                "stage": "train",
                "model": {"arch": "lenet5", "width": 1.0},
                "epochs": args.epochs,
                "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005},
                "schedule": "onecycle",
                "output": "baseline",
            },
            *prunes,
            {"stage": "export", "formats": ["onnx"]},
            {"stage": "benchmark", "runtimes": ["onnxruntime"], "batch_sizes": [64]},
        ],
    }


def figures(run_dir: Path, scopes: list[str]) -> list[dict[str, Any]]:
    variants = json.loads((run_dir / "manifest.json").read_text())["variants"]
    results = json.loads((run_dir / "stages" / "benchmark" / "results.json").read_text())
    latency = {
        r["variant"]: r.get("latency_b64_p50_ms") for r in results if r.get("runtime") == "onnxruntime"
    }
    rows = []
    for scope in scopes:
        name = f"slim_{scope}"
        if name not in variants:
            rows.append({"scope": scope, "reached": False})
            continue
        m = variants[name]["metrics"]
        record = json.loads((run_dir / "stages" / f"slim-{scope}" / "result.json").read_text())
        shapes = next(v["info"]["layer_shapes"] for v in record["variants"] if v["name"] == name)
        base, mine = latency.get("baseline"), latency.get(name)
        rows.append(
            {
                "scope": scope,
                "reached": True,
                "macs_reduction": round(m["macs_reduction"], 3),
                "input_test": m["input_test_accuracy"],
                "before_finetune_test": m["test_accuracy_before_finetune"],
                "test": m["test_accuracy"],
                "ort_b64_ms": mine,
                "ort_b64_speedup": round(base / mine, 3) if base and mine else None,
                "out_channels": [s[0] for s in shapes.values()],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.benchmarks.slim_scopes", description=__doc__)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=2.0)
    parser.add_argument("--scopes", nargs="+", default=["uniform", "global", "macs"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/slim-scopes"))
    args = parser.parse_args(argv)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    config = args.artifacts / "slim-scopes.yaml"
    config.write_text(yaml.safe_dump(pipeline(args), sort_keys=False))
    rows = []
    for seed in args.seeds:
        artifacts = args.artifacts / f"seed{seed}"
        command = [
            sys.executable, "-m", "compress.run", str(config), "-q", "--set", f"seed={seed}",
            "--artifacts", str(artifacts), "--reports", str(artifacts / "reports"),
        ]  # fmt: skip
        print(f"== seed {seed}", flush=True)
        subprocess.run(command, check=False)
        run_dir = artifacts / "slim-scopes" / "latest"
        if not (run_dir / "manifest.json").is_file():
            print(f"seed {seed}: no run directory", file=sys.stderr)
            continue
        for row in figures(run_dir, args.scopes):
            rows.append({"seed": seed, **row})
            if not row["reached"]:
                print(f"seed {seed} {row['scope']:>8}: unreachable", flush=True)
                continue
            print(
                f"seed {seed} {row['scope']:>8}: {row['macs_reduction']:.2f}x MACs, test "
                f"{100 * row['input_test']:.2f} -> {100 * row['before_finetune_test']:.2f} (pruned) -> "
                f"{100 * row['test']:.2f} % (fine-tuned), ORT b64 {row['ort_b64_ms']} ms "
                f"({row['ort_b64_speedup']}x), channels {row['out_channels']}",
                flush=True,
            )
    print("slim-scopes-result: " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
