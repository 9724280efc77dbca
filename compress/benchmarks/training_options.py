"""Training settings on torchvision builders: what one short epoch reaches under each option.

    python -m compress.benchmarks.training_options [--models mobilenet_v3_small resnet18 ...]
        [--options sgd:0.05:128 sgd:0.05:16 adamw:0.001:16 sgd:auto:16 ...]
        [--train 2000] [--epochs 1] [--data-root DIR]

Each option is ``optimizer:lr:batch`` (``lr`` may be ``auto``, ``batch`` may be ``auto``), or
``default``: what the train stage does with the optimizer and batch size left out (the batch
rule, and on a short run the optimizer probe of ``compress.optimizer_choice``). Every
model is built as the train stage builds it (MNIST at 32 px, 3 channels, 10 classes), trained
with ``training.fit`` (BatchNorm adaptation included) from the same seed, and scored on 1,000
test images. Prints one JSON line per run and a table; README "Training defaults" quotes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from compress.config import DataConfig, TrainingConfig
from compress.data import load_data
from compress.data.root import resolve_root
from compress.measure import evaluate
from compress.models import build_model
from compress.optimizer_choice import fit_with_choice
from compress.training import FitSettings
from compress.training_defaults import baseline_batch_size

DEFAULT_MODELS = ["mobilenet_v3_small", "resnet18", "efficientnet_b0", "regnet_x_400mf", "squeezenet1_1"]
DEFAULT_OPTIONS = ["sgd:0.05:128", "sgd:0.05:16", "adamw:0.001:16", "sgd:auto:16"]


def settings(option: str, epochs: int, train_images: int) -> TrainingConfig:
    """``sgd:0.05:16`` -> the training settings it names (weight decay 0.05 for AdamW)."""
    if option == "default":
        return baseline_batch_size(TrainingConfig(epochs=epochs), train_images)
    name, lr, batch = option.split(":")
    optimizer = {"name": name, "lr": lr if lr == "auto" else float(lr)}
    if name == "adamw":
        optimizer["weight_decay"] = 0.05
    return TrainingConfig(
        epochs=epochs, optimizer=optimizer, batch_size=None if batch == "auto" else int(batch)
    )


def run_one(name: str, option: str, bundle, epochs: int) -> dict:
    torch.manual_seed(0)
    spec = {"arch": "torchvision", "torchvision": name, **bundle.model_fields()}
    model = build_model(spec)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        run = FitSettings(
            settings(option, epochs, len(bundle.train)), torch.device("cpu"), 0, Path(work), desc=name
        )
        result, probe = fit_with_choice(model, bundle, run)
    return {
        "model": name,
        "option": option,
        "test_accuracy": evaluate(model, bundle, bundle.test, torch.device("cpu"))["accuracy"],
        "train_loss": round(result.history[-1]["train_loss"], 3),
        "settings": {**result.derived, "lr_auto": (result.derived.get("lr_auto") or {}).get("used")},
        "chosen": probe and probe["chosen"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compress.benchmarks.training_options", description=__doc__
    )
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS)
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-root", default=None, help="as the CLI: else COMPRESS_DATA_ROOT, the cache")
    args = parser.parse_args(argv)
    data = DataConfig(dataset="mnist", image_size=32, channels=3, limit_train=args.train, limit_test=1000)
    root, _ = resolve_root(args.data_root, None, Path.cwd())
    bundle = load_data(data, root)
    rows = []
    for name in args.models:
        for option in args.options:
            row = run_one(name, option, bundle, args.epochs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| builder | {' | '.join(args.options)} |\n|---|{'---|' * len(args.options)}")
    for name in args.models:
        cells = [f"{100 * r['test_accuracy']:.1f} %" for r in rows if r["model"] == name]
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
