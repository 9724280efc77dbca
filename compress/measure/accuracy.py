"""Accuracy: a model scored on one split (loss, top-1, per class), and top-1 accuracy from
stored predictions, the same way everywhere.

``evaluate`` is what scores a model after training (``training.fit``), what adjusts one before
it is scored (``batchnorm``) and what the stages use, so each number is taken the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress import distributed
from compress.data import DataBundle, Split, iterate_batches
from compress.layout import channels_last
from compress.measure.latency import ort_session

# Evaluation batch: a conv net in channels-last memory scores 10,000 MNIST images in 0.7 s on 2
# CPU cores at batch 256-500 and in 1.1 s at batch 1000 (its caches overflow).
EVAL_BATCH = 256


@torch.no_grad()
def evaluate(
    model: nn.Module,
    bundle: DataBundle,
    split: Split,
    device: torch.device,
    batch_size: int = EVAL_BATCH,
) -> dict[str, Any]:
    """Loss, top-1 accuracy and per-class accuracy of ``model`` on ``split``.

    Under DDP every rank scores every world-size-th image and the counts are summed, so each
    image is scored exactly once overall and the result equals the single-process one.
    """
    model.eval()
    num_classes = bundle.num_classes
    correct = torch.zeros(num_classes, dtype=torch.long)
    totals = torch.zeros(num_classes, dtype=torch.long)
    loss_sum = 0.0
    shard = distributed.eval_shard(len(split)) if distributed.active() else None
    with channels_last(model):
        for x, y in iterate_batches(bundle, split, batch_size, device, indices=shard):
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            hits = (logits.argmax(1) == y).cpu()
            y_cpu = y.cpu()
            totals += torch.bincount(y_cpu, minlength=num_classes)
            correct += torch.bincount(y_cpu[hits], minlength=num_classes)
    if shard is not None:
        correct, totals = distributed.all_reduce_sum(torch.stack([correct, totals])).unbind(0)
        loss_sum = distributed.all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64)).item()
    n = int(totals.sum())
    per_class = {
        bundle.classes[i]: (correct[i] / totals[i]).item() if totals[i] else None for i in range(num_classes)
    }
    return {
        "loss": loss_sum / max(n, 1),
        "accuracy": int(correct.sum()) / max(n, 1),
        "correct": int(correct.sum()),
        "count": n,
        "per_class_accuracy": per_class,
    }


def accuracy_from_predictions(
    predictions: np.ndarray, labels: np.ndarray, classes: list[str]
) -> tuple[float, int, dict[str, float | None]]:
    """Top-1 accuracy, correct count and per-class accuracy (None for an absent class)."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    hits = predictions == labels
    per_class: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        mask = labels == index
        per_class[name] = float(hits[mask].mean()) if mask.any() else None
    correct = int(hits.sum())
    return correct / max(len(labels), 1), correct, per_class


def accuracy_of(
    predict: Callable[[torch.Tensor], Any], bundle: DataBundle, split: Split, batch_size: int = 500
) -> dict[str, Any]:
    """Top-1 accuracy of any ``predict(normalised batch) -> logits`` over ``split``."""
    correct, count = 0, 0
    for start in range(0, len(split), batch_size):
        x = bundle.normalize(split.x[start : start + batch_size])
        logits = predict(x)
        pred = np.asarray(logits.detach() if isinstance(logits, torch.Tensor) else logits).argmax(1)
        correct += int((torch.from_numpy(pred) == split.y[start : start + batch_size]).sum())
        count += len(pred)
    return {"accuracy": correct / max(count, 1), "correct": correct, "count": count}


def onnx_predictor(path: Path, threads: int = 0) -> Callable[[torch.Tensor], np.ndarray]:
    """``predict(normalised batch) -> logits`` of an ONNX file in a benchmark-style onnxruntime
    session; ``threads=0`` lets onnxruntime choose (scoring is not timed, so it may use every core)."""
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: x.cpu().numpy().astype(np.float32, copy=False)})[0]

    return predict


def onnx_accuracy(path: Path, bundle: DataBundle, split: Split, batch_size: int = 500) -> dict[str, Any]:
    """Run an ONNX file in onnxruntime over ``split`` (normalised as the bundle says)."""
    return accuracy_of(onnx_predictor(path), bundle, split, batch_size)
