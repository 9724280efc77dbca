"""Stage ``train``: the baseline every compressed variant is compared against."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from compress.config import ModelConfig, StageConfig, TrainingConfig, project_file
from compress.context import Context
from compress.errors import ArtifactError
from compress.fileio import sha256_file
from compress.models import (
    apply_state,
    build_model,
    count_parameters,
    is_model_payload,
    load_checkpoint,
    save_model,
)
from compress.stages import stage
from compress.training import evaluate, fit
from compress.variants import StageResult, Variant


class TrainConfig(StageConfig, TrainingConfig):
    stage: Literal["train"]
    tunable: ClassVar[bool] = True
    model: ModelConfig = ModelConfig()
    output: str = "baseline"
    # start from the weights of a compress model file (model.pt of any run) instead of random
    # ones; a path inside the project, relative to the working directory
    init: str | None = Field(None, exclude_if=lambda v: v is None)

    def consumes(self, available: list[str]) -> list[str]:
        if self.from_:
            raise ValueError("from: the train stage starts from scratch and takes no input")
        return []

    def check(self, pipeline: object) -> None:
        if self.init is not None:
            init_state(self)  # a missing, foreign or mismatched file fails before anything runs

    def cache_extras(self, pipeline: object) -> dict[str, str]:
        """The init file's content is part of what this stage makes."""
        return {"init_sha256": sha256_file(project_file(self.init, "init"))} if self.init else {}

    def produces(self, inputs: list[str]) -> list[str]:
        return [self.output]


def init_state(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The state dict in ``cfg.init``, loaded with weights_only; ValueError('init: ...') if unusable."""
    path = project_file(cfg.init or "", "init")
    if not path.is_file():
        raise ValueError(f"init: {cfg.init}: file not found (looked in {path.parent})")
    try:
        payload = load_checkpoint(path)
    except ArtifactError as exc:
        raise ValueError(f"init: {exc}") from None
    if not is_model_payload(payload):
        raise ValueError(
            f"init: {cfg.init} is not a compress model file (a model.pt written by a train, prune or "
            "distill stage)"
        )
    spec, state = payload["spec"], payload["state"]
    if spec.get("arch") != cfg.model.arch:
        raise ValueError(
            f"init: {cfg.init} holds a {spec.get('arch')!r} model, but model.arch is {cfg.model.arch!r}"
        )
    return state


@stage("train", TrainConfig, version=2, distributed=True)
def run(cfg: TrainConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    bundle = ctx.data()
    spec = {**cfg.model.spec(), **bundle.model_fields()}
    torch.manual_seed(ctx.seed)  # the initial weights depend on the seed alone, not on what ran before
    model = build_model(spec)
    if cfg.init is not None:
        try:
            state = init_state(cfg)
        except ValueError as exc:  # the file changed since the pipeline was validated
            raise ArtifactError(f"stage {cfg.label!r}: {exc}") from None
        try:
            apply_state(model, state)  # resizes e.g. a channel-pruned model's narrower layers
        except ValueError as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ArtifactError(
                f"stage {cfg.label!r}: init: the weights in {cfg.init} do not fit the model: {first}"
            ) from None
        ctx.log.info("train: initial weights from %s", cfg.init)
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
