"""Training in the torchvision-reference style: plain functions a stage wires together.

``fit`` checkpoints after every epoch (atomically) into a work directory and resumes from
the last checkpoint it finds there, so a killed run loses at most one epoch. The same
``fit`` trains baselines, fine-tunes pruned models and distils students (``teacher=``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compress.config import TrainingConfig
from compress.data import DataBundle, Split, iterate_batches
from compress.fileio import atomic_path, write_json
from compress.models import load_checkpoint

log = logging.getLogger(__name__)
EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class Distillation:
    """Teacher and the Hinton et al. loss settings; the teacher is never updated."""

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.5
    # Optional teacher logits for every training image, row i for bundle.train row i. Only
    # valid without augmentation (the teacher must see exactly the images the student sees);
    # it saves the teacher's forward pass in every epoch.
    logits: torch.Tensor | None = None


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    seconds: float = 0.0


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy."""
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=opt.lr,
            momentum=opt.momentum,
            nesterov=opt.nesterov and opt.momentum > 0,
            weight_decay=opt.weight_decay,
        )
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        warm = cfg.warmup_epochs * steps_per_epoch / total if cfg.warmup_epochs else 0.15
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.optimizer.lr,
            total_steps=total,
            pct_start=min(max(warm, 0.01), 0.9),
            anneal_strategy="cos",
            cycle_momentum=cfg.optimizer.name == "sgd",
        )
    if cfg.schedule == "cosine":
        warm_steps = int(cfg.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm_steps:
                return (step + 1) / warm_steps
            progress = (step - warm_steps) / max(1, total - warm_steps)
            return 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(progress, 1.0))).item())

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def train_one_epoch(
    model: nn.Module,
    bundle: DataBundle,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainingConfig,
    device: torch.device,
    seed: int,
    desc: str,
    distill: Distillation | None = None,
    scaler: torch.amp.GradScaler | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over the training split; ``after_step`` lets pruning re-apply its masks."""
    model.train()
    batch_size = cfg.batch_size or 128
    cached = distill is not None and distill.logits is not None
    if cached and (cfg.augment != "none" or len(distill.logits) != len(bundle.train)):
        raise ValueError("cached teacher logits need augment 'none' and one row per training image")
    batches = iterate_batches(
        bundle,
        bundle.train,
        batch_size,
        device,
        shuffle=True,
        seed=seed,
        augment=cfg.augment,
        with_index=cached,
    )
    total_loss, correct, seen = 0.0, 0, 0
    steps = (len(bundle.train) + batch_size - 1) // batch_size
    bar = tqdm(batches, total=steps, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
    for batch in bar:
        x, y = batch[0], batch[1]
        with _autocast(device, cfg.amp):
            logits = model(x)
            if distill is not None:
                if cached:
                    teacher_logits = distill.logits[batch[2]].to(device)
                else:
                    with torch.no_grad():
                        teacher_logits = distill.teacher(x)
                loss = kd_loss(
                    logits.float(),
                    teacher_logits.float(),
                    y,
                    distill.temperature,
                    distill.alpha,
                    cfg.label_smoothing,
                )
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    bundle: DataBundle,
    split: Split,
    device: torch.device,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Loss, top-1 accuracy and per-class accuracy of ``model`` on ``split``."""
    model.eval()
    num_classes = bundle.num_classes
    correct = torch.zeros(num_classes, dtype=torch.long)
    totals = torch.zeros(num_classes, dtype=torch.long)
    loss_sum = 0.0
    for x, y in iterate_batches(bundle, split, batch_size, device):
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        hits = (logits.argmax(1) == y).cpu()
        y_cpu = y.cpu()
        totals += torch.bincount(y_cpu, minlength=num_classes)
        correct += torch.bincount(y_cpu[hits], minlength=num_classes)
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


def fit(
    model: nn.Module,
    bundle: DataBundle,
    cfg: TrainingConfig,
    device: torch.device,
    seed: int,
    workdir: Path,
    desc: str = "train",
    distill: Distillation | None = None,
    after_step: Callable[[], None] | None = None,
    on_epoch: EpochHook | None = None,
) -> FitResult:
    """Train for ``cfg.epochs``, validating each epoch; resumable from ``workdir``.

    The checkpoint holds model, optimizer, scheduler and history, saved after every epoch;
    the per-epoch shuffle is seeded by (seed, epoch), so a resumed run sees the same batches
    it would have seen without the interruption.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = workdir / "checkpoint.pt"
    torch.manual_seed(seed)
    model.to(device)
    if distill is not None:
        distill.teacher.to(device).eval()
        for p in distill.teacher.parameters():
            p.requires_grad_(False)
    optimizer = make_optimizer(model, cfg)
    batch_size = cfg.batch_size or 128
    steps_per_epoch = (len(bundle.train) + batch_size - 1) // batch_size
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    result = FitResult()
    start_epoch = 0
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result.history = list(state["history"])
        start_epoch = result.resumed_from_epoch = int(state["epoch"])
        log.info("%s: resuming from %s after epoch %d", desc, checkpoint_path, start_epoch)

    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        tic = time.perf_counter()
        stats = train_one_epoch(
            model,
            bundle,
            optimizer,
            scheduler,
            cfg,
            device,
            seed=seed * 100_003 + epoch,
            desc=f"{desc} {epoch + 1}/{cfg.epochs}",
            distill=distill,
            scaler=scaler,
            after_step=after_step,
        )
        val = evaluate(model, bundle, bundle.val, device) if len(bundle.val) else None
        row = {
            "epoch": epoch + 1,
            **stats,
            "val_loss": val["loss"] if val else None,
            "val_accuracy": val["accuracy"] if val else None,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - tic,
        }
        result.history.append(row)
        log.info(
            "%s epoch %d/%d: loss %.4f train acc %.4f val acc %s (%.1fs)",
            desc,
            epoch + 1,
            cfg.epochs,
            row["train_loss"],
            row["train_accuracy"],
            f"{row['val_accuracy']:.4f}" if val else "n/a",
            row["seconds"],
        )
        with atomic_path(checkpoint_path) as tmp:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": result.history,
                    "epoch": epoch + 1,
                },
                tmp,
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, {**row, "epochs": cfg.epochs})  # epochs: so a hook knows the last one
    result.seconds = time.perf_counter() - started
    write_json(workdir / "history.json", result.history)
    return result
