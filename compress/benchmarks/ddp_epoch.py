"""Wall time of a ResNet-20 training epoch with 1 and N processes (DDP under torchrun).

    python -m compress.benchmarks.ddp_epoch                      # 5,000 generated CIFAR images
    python -m compress.benchmarks.ddp_epoch --processes 1 2 4 --device cuda --images 45000 \\
        --data-root ~/data                                      # real CIFAR-10 on a GPU box

Without ``--data-root`` it writes a generated CIFAR-10 set (``cifar_files`` beside it) into a
temporary folder. Each setting runs in fresh processes: one plain process (torch's default
thread count), and ``python -m torch.distributed.run --nproc_per_node N`` for N > 1 (one thread
per process on a CPU, as torchrun sets it). Every setting trains the same model from the same
seed with the same global batch through ``training.fit``, the code the pipeline runs; the time
of each epoch is rank 0's, including the all-reduce of the epoch's metrics. It prints one line
per setting and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from compress import distributed
from compress.benchmarks.cifar_files import write_cifar10
from compress.config import DataConfig, ModelConfig, OptimizerConfig, TrainingConfig
from compress.data import load_data
from compress.measure import count_parameters
from compress.models import build_model
from compress.training import FitSettings, fit

RESULT_PREFIX = "ddp-epoch-result: "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compress.benchmarks.ddp_epoch", description=__doc__)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (1 2)")
    parser.add_argument("--images", type=int, default=5000, help="training images (5000)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setting; each is reported (2)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (128)")
    parser.add_argument("--arch", default="resnet20", help="model (resnet20)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="(cpu)")
    parser.add_argument("--data-root", type=Path, help="folder with cifar-10-batches-py (default: generated)")
    parser.add_argument(
        "--threads", type=int, help="threads per process (default: torch's for 1 process, 1 under torchrun)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return _child(args)
    with tempfile.TemporaryDirectory(prefix="ddp-epoch-") as tmp:
        root = args.data_root
        if root is None:
            root = Path(tmp) / "data"
            write_cifar10(root, n_train=args.images, n_test=100, seed=0)
        rows = [_launch(args, n, root) for n in args.processes]
    base = rows[0]["epoch_seconds"][-1]
    print(f"\nResNet-20 epoch on {args.images} images, global batch {args.batch_size}, device {args.device}:")
    for row in rows:
        epochs = ", ".join(f"{s:.1f}s" for s in row["epoch_seconds"])
        print(
            f"  {row['processes']} process(es) x {row['threads']} thread(s): epochs {epochs}; "
            f"last epoch speed-up {base / row['epoch_seconds'][-1]:.2f}x; "
            f"process wall {row['wall_seconds']:.1f}s; train acc {row['train_accuracy']:.3f}"
        )
    print(json.dumps(rows))
    return 0


def _launch(args: argparse.Namespace, processes: int, root: Path) -> dict:
    child = [
        "-m", "compress.benchmarks.ddp_epoch", "--child", "--data-root", str(root),
        "--images", str(args.images), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
        "--arch", args.arch, "--device", args.device,
    ]  # fmt: skip
    if processes == 1:
        command = [sys.executable, *child]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port), *child,
        ]  # fmt: skip
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    elif processes == 1:
        env.pop("OMP_NUM_THREADS", None)  # one process uses every core, as a user's run would
    else:
        env["OMP_NUM_THREADS"] = "1"  # what torchrun sets by default
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{processes} process(es) failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    row = json.loads(lines[0][len(RESULT_PREFIX) :])
    row["wall_seconds"] = round(wall, 2)
    print(f"{processes} process(es): epochs {row['epoch_seconds']} s", flush=True)
    return row


def _child(args: argparse.Namespace) -> int:
    with distributed.session():
        name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        device = distributed.local_device(torch.device(name))
        spec = DataConfig(dataset="cifar10", val_size=0, limit_train=args.images, download=False)
        bundle = load_data(spec, args.data_root, "--data-root")
        torch.manual_seed(0)
        model = build_model({**ModelConfig(arch=args.arch).spec(), **bundle.model_fields()})
        cfg = TrainingConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4),
            schedule="cosine",
            augment="crop_flip",
        )
        with tempfile.TemporaryDirectory(prefix="ddp-epoch-work-") as work:
            distributed.barrier()  # every rank has its data and model: start together
            result = fit(model, bundle, FitSettings(cfg, device, seed=0, workdir=Path(work), desc="epoch"))
        if distributed.is_main():
            row = {
                "processes": distributed.world_size(),
                "threads": torch.get_num_threads(),
                "device": str(device),
                "precision": result.precision,
                "images": len(bundle.train),
                "parameters": count_parameters(model),
                "epoch_seconds": [round(r["seconds"], 2) for r in result.history],
                "train_accuracy": result.history[-1]["train_accuracy"],
            }
            print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
