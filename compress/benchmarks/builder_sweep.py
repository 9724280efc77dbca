"""Every torchvision builder through the public CLI: train, prune, slim, int8, ONNX, verify.

    python -m compress.benchmarks.builder_sweep TREE [--models NAME ...] [--set KEY=VALUE ...]
        [--artifacts DIR] [--reports DIR] [--timeout SECONDS] [--json FILE]

runs, per builder (default: every ``torchvision.models`` classifier), one pipeline on the
ImageFolder tree ``TREE`` (3 channels, 32 px): train 1 epoch with the default settings,
magnitude prune, structured prune ("slim"), static int8 of the slim model in onnxruntime, ONNX
export; then
``python -m compress.verify`` on the export's deploy bundle. It prints a table (builder,
outcome: ok / refused: the one-line message / failed: exit code and last line, baseline and
slim test accuracy, slim rebuilt and verified, seconds) and a JSON summary. A builder the
pipeline refuses (exit 2 with one line) is a correct outcome; exit 3 or a traceback is a bug.
Make the tree with ``python -m compress.data.to_imagefolder TREE --train 2000 --test 1000``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PIPELINE = """\
seed: 0
device: cpu
data: {{dataset: imagefolder, image_size: 32, channels: 3, batch_size: 64, val_size: 200}}
stages:
  - stage: train  # every training setting left at its default: what a new user gets
    model: {{torchvision: {model}}}
    epochs: 1
  - stage: prune
    method: magnitude
    amount: 0.5
    schedule: oneshot
    finetune: {{epochs: 1, optimizer: {{name: sgd, lr: 0.01}}}}
  - stage: prune
    name: slim
    method: structured
    amount: 0.3
    finetune: {{epochs: 1, optimizer: {{name: sgd, lr: 0.01}}}}
  - stage: quantize
    from: [slim]
    modes: [static]
    calibration: {{images: 256}}
    tolerance: null
    latency: {{rounds: 1, runs: 1, batch_size: 8}}
  - stage: export
    formats: [onnx]
    parity_samples: 64
    parity_atol: 0.001  # fp32 rounding in onnxruntime (MNASNet: 1.1e-4); top-1 is checked too
"""


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:600] if lines else ""


def _refusal(text: str) -> str:
    """The CLI's error, from its ``error:`` line on (a pipeline with several problems lists each)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), max(0, len(lines) - 1))
    return " / ".join(lines[start:])[:600]


def _figures(run_dir: Path) -> dict[str, Any]:
    """Baseline and slim test accuracy, and whether the slim ONNX file was exported and checked."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    variants = manifest.get("variants", {})

    def accuracy(name: str) -> float | None:
        return variants.get(name, {}).get("metrics", {}).get("test_accuracy")

    export = run_dir / "stages" / "export" / "export.json"
    files = json.loads(export.read_text()).get("slim", {}).get("files", {}) if export.is_file() else {}
    onnx = files.get("onnx", {})
    return {
        "baseline_accuracy": accuracy("baseline"),
        "slim_accuracy": accuracy("slim"),
        "slim_onnx_ok": bool(onnx.get("ok")),
        "slim_onnx_error": onnx.get("error"),
    }


def sweep_one(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """One builder's pipeline and verify, summarised as a row."""
    started = time.perf_counter()
    work = args.artifacts / model
    work.mkdir(parents=True, exist_ok=True)
    pipeline = work / "sweep.yaml"
    pipeline.write_text(PIPELINE.format(model=model))
    command = [
        sys.executable, "-m", "compress.run", str(pipeline), "--data-root", str(args.tree), "-q",
        "--artifacts", str(work / "artifacts"), "--reports", str(work / "reports"),
        *[item for override in args.overrides for item in ("--set", override)],
    ]  # fmt: skip
    row: dict[str, Any] = {"model": model}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**row, "outcome": f"failed: timeout after {args.timeout} s", "seconds": args.timeout}
    row["exit_code"] = done.returncode
    if done.returncode == 2:
        row["outcome"] = "refused: " + _refusal(done.stderr)
    elif done.returncode not in (0, 1):
        row["outcome"] = f"failed: exit {done.returncode}: {_last_line(done.stderr or done.stdout)}"
    else:
        run_dir = (work / "artifacts" / "sweep" / "latest").resolve()
        row.update(_figures(run_dir))
        verify = subprocess.run(
            [sys.executable, "-m", "compress.verify", str(run_dir / "stages" / "export" / "deploy")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        row["verify_exit_code"] = verify.returncode
        row["slim_verified"] = row["slim_onnx_ok"] and verify.returncode == 0
        if not row["slim_onnx_ok"]:
            row["outcome"] = f"failed: slim ONNX export: {str(row['slim_onnx_error'])[:300]}"
        else:
            row["outcome"] = "ok" if verify.returncode == 0 else f"failed: verify exit {verify.returncode}"
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    def pct(value: float | None) -> str:
        return f"{100 * value:.2f} %" if value is not None else "-"

    lines = ["| builder | outcome | baseline acc | slim acc | slim rebuilt+verified | s |", "|---" * 6 + "|"]
    for r in rows:
        verified = {True: "yes", False: "no"}.get(r.get("slim_verified"), "-")
        lines.append(
            f"| {r['model']} | {r['outcome']} | {pct(r.get('baseline_accuracy'))} | "
            f"{pct(r.get('slim_accuracy'))} | {verified} | {r['seconds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.benchmarks.builder_sweep", description=__doc__)
    parser.add_argument("tree", type=Path, help="the ImageFolder tree (train/, test/)")
    parser.add_argument("--models", nargs="+", default=None, help="builders (default: every one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/builder_sweep"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per builder")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    args.tree = args.tree.resolve()
    if args.models is None:
        import torchvision

        args.models = sorted(torchvision.models.list_models(module=torchvision.models))
    rows = []
    for model in args.models:
        rows.append(sweep_one(model, args))
        print(json.dumps(rows[-1]), flush=True)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("builder-sweep-result: " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
