"""Stage ``train``: the baseline every compressed variant is compared against."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

import torch

from compress.config import ModelConfig, StageConfig, TrainingConfig
from compress.context import Context
from compress.models import build_model, count_parameters, save_model
from compress.stages import stage
from compress.training import evaluate, fit
from compress.variants import StageResult, Variant


class TrainConfig(StageConfig, TrainingConfig):
    stage: Literal["train"]
    tunable: ClassVar[bool] = True
    model: ModelConfig = ModelConfig()
    output: str = "baseline"

    def consumes(self, available: list[str]) -> list[str]:
        if self.from_:
            raise ValueError("from: the train stage starts from scratch and takes no input")
        return []

    def produces(self, inputs: list[str]) -> list[str]:
        return [self.output]


@stage("train", TrainConfig, version=2)
def run(cfg: TrainConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    bundle = ctx.data()
    spec = {**cfg.model.spec(), **bundle.model_fields()}
    torch.manual_seed(ctx.seed)  # the initial weights depend on the seed alone, not on what ran before
    model = build_model(spec)
    ctx.log.info(
        "train: %s (width %s), %d parameters, %d training / %d validation images, device %s",
        cfg.model.arch,
        cfg.model.width,
        count_parameters(model),
        len(bundle.train),
        len(bundle.val),
        ctx.device,
    )
    started = time.perf_counter()
    result = fit(
        model, bundle, cfg, ctx.device, ctx.seed, out_dir / "work", desc=cfg.label, on_epoch=ctx.on_epoch
    )
    wall = time.perf_counter() - started
    # a tuning trial is scored on validation data only: there the test split is off limits
    empty = {"accuracy": None, "correct": None, "count": None, "per_class_accuracy": None}
    test = empty if ctx.tuning else evaluate(model, bundle, bundle.test, ctx.device)
    val = evaluate(model, bundle, bundle.val, ctx.device) if len(bundle.val) else None
    save_model(model.cpu(), spec, out_dir / "model.pt")
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_correct": test["correct"],
        "test_count": test["count"],
        "val_accuracy": val["accuracy"] if val else None,
        "per_class_accuracy": test["per_class_accuracy"],
        "parameters": count_parameters(model),
        "epochs": cfg.epochs,
        "train_seconds": round(wall, 2),
        "resumed_from_epoch": result.resumed_from_epoch,
    }
    variant = Variant(
        name=cfg.output,
        format="torch",
        file=out_dir / "model.pt",
        stage=cfg.label,
        metrics=metrics,
        info={"arch": cfg.model.arch, "spec": spec, "curves": "work/history.json"},
    )
    return StageResult(variants=[variant], metrics={"history": result.history, **metrics})
