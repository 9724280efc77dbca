"""Training in the torchvision-reference style: plain functions a stage wires together.

``fit`` checkpoints after every epoch (atomically) into a work directory and resumes from
the last checkpoint it finds there, so a killed run loses at most one epoch. The same
``fit`` trains baselines, fine-tunes pruned models and distils students
(``FitSettings.distill``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compress import checkpoints, distributed, faults, training_defaults
from compress.batchnorm import adapt_batchnorm
from compress.config import TrainingConfig
from compress.data import DataBundle, iterate_batches
from compress.errors import ConfigError
from compress.fileio import write_json
from compress.layout import channels_last, is_conv_net
from compress.measure import evaluate

log = logging.getLogger(__name__)
EpochHook = Callable[[int, dict[str, float]], None]


class FeatureLoss(Protocol):
    """A teacher's intermediate-feature loss as ``fit`` handles it: hooked into both models for
    the fit and unhooked after it. It is an ``nn.Module`` whose parameters (a hint regressor) train
    and are checkpointed with the student (``distillation.losses.FeatureDistillation``)."""

    def bind(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None: ...

    def unbind(self) -> None: ...


class Distiller(Protocol):
    """What ``fit`` distils a student from (``distillation.teacher.Distillation``), named here so
    training never imports the distillation package that builds on it.

    ``fit`` freezes ``teacher`` and binds ``features``; ``train_one_epoch`` checks the cached
    ``logits`` (one row per training image, no augmentation) and takes each batch's ``loss``.
    Read-only properties, so a dataclass's plain fields of narrower types satisfy them.
    """

    @property
    def teacher(self) -> nn.Module: ...

    @property
    def logits(self) -> torch.Tensor | None: ...

    @property
    def features(self) -> FeatureLoss | None: ...

    def loss(
        self,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        rows: torch.Tensor | None,
        device: torch.device,
        label_smoothing: float,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class FitSettings:
    """What ``fit`` trains with besides the model and the data: the training settings, the device
    and seed, the work directory its checkpoints go to, and the optional teacher and hooks.

    One value instead of ten arguments, so that a call site names what it sets and leaves the
    rest at their defaults; ``train_one_epoch`` takes the same value.
    """

    cfg: TrainingConfig
    device: torch.device
    seed: int
    workdir: Path
    desc: str = "train"  # names the fit in the progress bar, the log and error messages
    distill: Distiller | None = None  # a teacher: the KD loss (plus any feature loss)
    after_step: Callable[[], None] | None = None  # pruning re-applies its masks, QAT freezes observers
    on_epoch: EpochHook | None = None  # a tuning trial reports each epoch (and may stop the fit)


@dataclass
class Stepper:
    """What turns a batch's loss into a weight update: the optimizer and its schedule, and the
    precision the forward passes compute in (fp16 through a grad scaler, made here)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: str = "fp32"  # resolve_precision
    scaler: torch.amp.GradScaler | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """Mixed precision for the forward pass on CUDA; nothing in fp32 or on a CPU."""
        if device.type == "cuda" and self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return nullcontext()

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step (through the grad scaler when there is one) and one scheduler step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    precision: str = "fp32"  # what the forward passes computed in (resolve_precision)
    world_size: int = 1  # processes that trained it together (DDP)
    # the settings derived from the data (training_defaults): batch size, lr auto's range test
    derived: dict[str, Any] = field(default_factory=dict)
    batchnorm: dict[str, Any] | None = None  # the BatchNorm adaptation's record (compress.batchnorm)

    @property
    def val_accuracy(self) -> float | None:
        """The fitted model's validation accuracy: after BatchNorm adaptation, when that ran."""
        if self.batchnorm is not None and self.batchnorm["kept"]:
            return self.batchnorm["val_accuracy_after"]
        return self.history[-1]["val_accuracy"] if self.history else None


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


def resolve_precision(cfg: TrainingConfig, device: torch.device) -> str:
    """What training with ``cfg`` computes in on ``device``: 'fp32', 'bf16' or 'fp16'.

    ``auto`` is mixed precision on CUDA (bf16 where the GPU supports it, else fp16, which
    needs a grad scaler) and fp32 on a CPU. Raises ConfigError for a precision the device lacks.
    """
    wanted = cfg.precision if cfg.amp else "fp32"
    if device.type != "cuda":
        if wanted in ("bf16", "fp16"):
            raise ConfigError(
                f"precision: {wanted} needs a CUDA device, this run trains on {device}; "
                "use precision: auto (fp32 on a CPU) or fp32"
            )
        return "fp32"
    if wanted == "auto":  # native bf16 (Ampere or newer); older GPUs only emulate it, slowly
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if wanted == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
            "use precision: auto (fp16 with a grad scaler there) or fp32"
        )
    return wanted


def training_configs(cfg: Any) -> dict[str, TrainingConfig]:
    """The training settings in a stage's config by YAML key prefix: ``""`` for the config
    itself (train, distill), ``"finetune."`` for a field such as prune's ``finetune``."""
    found = {"": cfg} if isinstance(cfg, TrainingConfig) else {}
    for name, info in type(cfg).model_fields.items() if hasattr(type(cfg), "model_fields") else ():
        value = getattr(cfg, name, None)
        if isinstance(value, TrainingConfig):
            found[f"{info.alias or name}."] = value
    return found


def _batch_loss(
    logits: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: tuple[torch.Tensor, ...],
    run: FitSettings,
) -> torch.Tensor:
    """Cross-entropy, or the teacher's loss (``Distiller.loss``); cached teacher logits are looked
    up by the batch's row indices, ``batch[2]``."""
    cfg, distill = run.cfg, run.distill
    if distill is None:
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    rows = batch[2] if distill.logits is not None else None
    return distill.loss(logits, x, y, rows, run.device, cfg.label_smoothing)


def train_one_epoch(
    model: nn.Module, bundle: DataBundle, run: FitSettings, stepper: Stepper, epoch: int
) -> dict[str, float]:
    """Pass ``epoch`` (from 0) over the training split; ``run.after_step`` lets pruning re-apply
    its masks. The shuffle and augmentation are seeded by (``run.seed``, ``epoch``), so a resumed
    fit sees the batches it would have seen without the interruption.

    Under DDP this rank reads its part of the epoch (``distributed.epoch_shard``, the shuffle
    ``DistributedSampler(seed=seed * 100_003).set_epoch(epoch)`` deals out) in order, in batches
    of ``batch_size / world size``, augmented with a per-rank seed, and the returned loss and
    accuracy are summed over all ranks.
    """
    cfg, device, distill = run.cfg, run.device, run.distill
    desc = f"{run.desc} {epoch + 1}/{cfg.epochs}"
    model.train()
    batch_size = cfg.batch_size or training_defaults.DEFAULT_BATCH
    seed, shard = run.seed * 100_003 + epoch, None
    cached = distill is not None and distill.logits is not None
    if cached and (cfg.augment != "none" or len(distill.logits) != len(bundle.train)):
        raise ValueError("cached teacher logits need augment 'none' and one row per training image")
    if cached and distill.features is not None:
        raise ValueError("a feature loss needs the teacher's features: it cannot use cached teacher logits")
    if distributed.active():  # already shuffled: read in order, augment with this rank's seed
        shard = distributed.epoch_shard(len(bundle.train), run.seed * 100_003, epoch)
        batch_size = distributed.per_rank_batch(batch_size, f"{desc}: batch_size")
        seed = distributed.rank_seed(seed)
    batches = iterate_batches(
        bundle,
        bundle.train,
        batch_size,
        device,
        shuffle=shard is None,
        seed=seed,
        augment=cfg.augment,
        indices=shard,
        with_index=cached,
    )
    steps = -(-(len(bundle.train) if shard is None else len(shard)) // batch_size)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(
        batches,
        total=steps,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not distributed.is_main(),
    )
    nhwc_input = is_conv_net(model)  # a conv net trains in channels-last memory (``fit``)
    for batch in bar:
        x, y = batch[0], batch[1]
        if nhwc_input:
            x = x.contiguous(memory_format=torch.channels_last)
        with stepper.autocast(device):
            logits = model(x)
            loss = _batch_loss(logits, x, y, batch, run)
        stepper.step(loss)
        if run.after_step is not None:
            run.after_step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
    if shard is not None:  # the epoch's totals over every rank's shard
        sums = distributed.all_reduce_sum(torch.tensor([total_loss, correct, seen], dtype=torch.float64))
        total_loss, correct, seen = sums[0].item(), int(sums[1]), int(sums[2])
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


def fit(model: nn.Module, bundle: DataBundle, settings: FitSettings) -> FitResult:
    """Train for ``settings.cfg.epochs``, validating each epoch; resumable from ``settings.workdir``.

    The checkpoint holds model, optimizer, scheduler and history, saved after every epoch;
    the per-epoch shuffle is seeded by (seed, epoch), so a resumed run sees the same batches
    it would have seen without the interruption.

    Conv nets train in channels-last memory (on any device). On CUDA: mixed precision as
    ``cfg.precision`` says (``resolve_precision``) and cuDNN's autotuner. Under torchrun: see
    ``_data_parallel``.
    """
    device, desc, workdir = settings.device, settings.desc, settings.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = workdir / "checkpoint.pt"
    torch.manual_seed(settings.seed)
    model.to(device)
    precision = resolve_precision(settings.cfg, device)
    # the batch size and lr the YAML left open, before any hook is bound (lr auto trains a copy)
    cfg, derived = training_defaults.resolve(settings, model, bundle, make_optimizer)
    run = replace(settings, cfg=cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    features = _freeze_teacher(model, run.distill, bundle, device)
    stepper = _stepper(model, features, bundle, run, precision)
    trained = {"model": model, "optimizer": stepper.optimizer, "scheduler": stepper.scheduler}
    trained = {**trained, "features": features} if features is not None else trained
    start_epoch, history = checkpoints.resume(checkpoint_path, trained, device, desc)
    world = distributed.world_size() if distributed.active() else 1
    result = FitResult(history, start_epoch, precision=precision, world_size=world, derived=derived)
    with channels_last(model, *([run.distill.teacher] if run.distill is not None else [])):
        net = _data_parallel(model, run, precision)
        started = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            tic = time.perf_counter()
            stats = train_one_epoch(net, bundle, run, stepper, epoch)
            seconds = time.perf_counter() - tic
            row = _epoch_row(model, bundle, device, stats, epoch + 1, stepper.optimizer, seconds)
            result.history.append(row)
            _log_epoch(row, cfg.epochs, desc)
            if distributed.is_main():  # the other ranks' workdirs are scratch copies
                checkpoints.save(checkpoint_path, trained, result.history, epoch + 1)
            faults.checkpoint(f"fit:{workdir}:epoch{epoch + 1}")
            if run.on_epoch is not None:
                run.on_epoch(epoch + 1, {**row, "epochs": cfg.epochs})  # epochs: so a hook knows the last one
    result.seconds = time.perf_counter() - started
    if features is not None:
        features.unbind()
    _adapt_and_record(model, bundle, run, result)
    return result


def _stepper(
    model: nn.Module,
    features: FeatureLoss | None,
    bundle: DataBundle,
    run: FitSettings,
    precision: str,
) -> Stepper:
    """The optimizer over the model (and the hint regressor, which trains with it) and a schedule
    as long as the epochs' steps: ``ceil(len(train) / batch)``, per rank's shard under DDP."""
    cfg = run.cfg
    optimizer = make_optimizer(model if features is None else nn.ModuleList([model, features]), cfg)
    batch_size = int(cfg.batch_size)  # concrete: training_defaults.resolve
    parallel = distributed.active()
    per_rank = distributed.per_rank_batch(batch_size, f"{run.desc}: batch_size") if parallel else batch_size
    shard_size = -(-len(bundle.train) // distributed.world_size()) if parallel else len(bundle.train)
    scheduler = make_scheduler(optimizer, cfg, -(-shard_size // per_rank))
    return Stepper(optimizer, scheduler, precision)


def _adapt_and_record(model: nn.Module, bundle: DataBundle, run: FitSettings, result: FitResult) -> None:
    """BatchNorm adaptation after the last epoch (also when every epoch was done before a resume:
    it depends on the weights alone), then the history file."""
    measured = result.history[-1]["val_accuracy"] if result.history else None
    cfg = run.cfg
    result.batchnorm = adapt_batchnorm(
        model,
        bundle,
        run.device,
        cfg.bn_adapt_batches,
        run.seed,
        run.desc,
        cfg.batch_size,
        log,
        val_before=measured,
    )
    if distributed.is_main():
        write_json(run.workdir / "history.json", result.history)


def _data_parallel(model: nn.Module, run: FitSettings, precision: str) -> nn.Module:
    """Under torchrun the model in DistributedDataParallel (rank 0's weights and buffers on every
    rank, dropout seeded per rank); otherwise the model itself.

    ``batch_size`` stays the global batch (each rank takes ``batch_size / world size`` of it, the
    epoch's shuffle dealt out as ``DistributedSampler`` does), so a step sees the same images as
    the single-process step and the schedule has the same length; only rank 0 writes
    checkpoints, and a resumed fit takes rank 0's checkpoint on every rank.
    """
    if not distributed.active():
        return model
    per_rank = distributed.per_rank_batch(int(run.cfg.batch_size), f"{run.desc}: batch_size")
    net = distributed.wrap(model, run.device)
    torch.manual_seed(distributed.rank_seed(run.seed))
    log.info(
        "%s: DistributedDataParallel on %d processes, %d images per process per step, %s",
        run.desc,
        distributed.world_size(),
        per_rank,
        precision,
    )
    return net


def _freeze_teacher(
    model: nn.Module, distill: Distiller | None, bundle: DataBundle, device: torch.device
) -> FeatureLoss | None:
    """The teacher on ``device``, in eval mode and never updated; a feature loss hooked into both
    models (the hint regressor trains with the student), which ``fit`` returns to optimise."""
    if distill is None:
        return None
    distill.teacher.to(device).eval()
    for p in distill.teacher.parameters():
        p.requires_grad_(False)
    if distill.features is not None:
        distill.features.bind(model, distill.teacher, torch.zeros(2, *bundle.input_shape, device=device))
    return distill.features


def _epoch_row(
    model: nn.Module,
    bundle: DataBundle,
    device: torch.device,
    stats: dict[str, float],
    epoch: int,
    optimizer: torch.optim.Optimizer,
    seconds: float,
) -> dict[str, Any]:
    """The epoch's line of the history: training loss and accuracy, validation, rate, time."""
    val = evaluate(model, bundle, bundle.val, device) if len(bundle.val) else None
    return {
        "epoch": epoch,
        **stats,
        "val_loss": val["loss"] if val else None,
        "val_accuracy": val["accuracy"] if val else None,
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": seconds,
    }


def _log_epoch(row: dict[str, Any], epochs: int, desc: str) -> None:
    val = row["val_accuracy"]
    log.info(
        "%s epoch %d/%d: loss %.4f train acc %.4f val acc %s (%.1fs)",
        desc,
        row["epoch"],
        epochs,
        row["train_loss"],
        row["train_accuracy"],
        f"{val:.4f}" if val is not None else "n/a",
        row["seconds"],
    )
