"""Stage ``train``: the baseline every compressed variant is compared against.

It trains a model from scratch, fine-tunes one from weights the user brings (``init``: their
own ``state_dict`` file, a checkpoint dict, or a compress ``model.pt``), or with ``epochs: 0``
takes those weights as they are, so "compress my trained model" is one short YAML.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_serializer, model_validator
from torch import nn

from compress.config import MAX_EPOCHS, ModelConfig, StageConfig, TrainingConfig, input_file
from compress.context import Context
from compress.data import nominal_model_fields
from compress.errors import ArtifactError
from compress.fileio import sha256_file
from compress.measure import count_parameters, evaluate
from compress.models import apply_state, build_model, is_model_payload, load_checkpoint, save_model
from compress.models.builders import forward_problem, size_problem
from compress.models.files import payload_state
from compress.models.weights import load_exact, state_dict_in
from compress.optimizer_choice import fit_with_choice
from compress.stages import stage
from compress.training import FitSettings
from compress.training_defaults import baseline_batch_size
from compress.variants import StageResult, Variant

# the data a model is built for when only its layer names matter (validation, before any data)
PLACEHOLDER_DATA = {"in_channels": 3, "image_size": 32, "num_classes": 10}


class TrainConfig(StageConfig, TrainingConfig):
    """Train the baseline every compressed variant is compared against, or bring your own weights."""

    stage: Literal["train"] = Field(description="Trains the baseline (or takes your weights).")
    tunable: ClassVar[bool] = True
    epochs: int = Field(
        10, ge=0, le=MAX_EPOCHS, description="Training epochs; 0: take init as it is (no training)."
    )
    model: ModelConfig = Field(ModelConfig(), description="The architecture.")
    output: str = Field("baseline", description="The variant's name.")
    # start from these weights instead of random ones: a state dict file (what
    # ``torch.save(model.state_dict(), path)`` writes), a checkpoint dict holding one
    # (``model_state_dict``, ``state_dict``), or a model.pt of any compress run; absolute, ~/...,
    # or relative to the working directory (config.safety.input_file)
    init: str | None = Field(  # left out of the dump when None (cache keys from before it existed)
        None,
        description="Start from these weights: a state dict, a checkpoint holding one, or a compress "
        "model.pt: an absolute path, ~/..., or relative to where you run; null: random weights.",
    )

    @model_serializer(mode="wrap")
    def _omit_unset_init(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("init", "") is None:
            del data["init"]
        return data

    @model_validator(mode="after")
    def _zero_epochs_need_weights(self) -> TrainConfig:
        if self.epochs == 0 and self.init is None:
            raise ValueError(
                "epochs: 0 trains nothing; give init: a weights file to compress a model as it is, "
                "or epochs >= 1"
            )
        if self.init is not None and self.model.weights is not None:
            raise ValueError("give init (your weights) or model.weights (pretrained), not both")
        return self

    def consumes(self, available: list[str]) -> list[str]:
        if self.from_:
            raise ValueError("from: the train stage starts from scratch and takes no input")
        return []

    def check(self, pipeline: object) -> None:
        if self.init is not None:
            init_state(self)  # a missing, foreign or mismatched file fails before anything runs
        fields = nominal_model_fields(pipeline.data)
        if fields is not None:  # an image folder without image_size: checked when the stage runs
            problem = size_problem({**self.model.spec(), **fields})
            if problem:
                raise ValueError(f"model: {problem}")

    def cache_extras(self, pipeline: object) -> dict[str, str]:
        """The init file's content (or pretrained weights file's) is part of what this stage makes."""
        extras = {"init_sha256": sha256_file(input_file(self.init, "init"))} if self.init else {}
        weights = self.model.weights
        if weights is not None and (input_file(weights, "weights")).is_file():
            extras["weights_sha256"] = sha256_file(input_file(weights, "weights"))
        return extras

    def produces(self, inputs: list[str]) -> list[str]:
        return [self.output]

    def architecture(self, variant: str, inputs: list[str], pipeline: Any) -> dict[str, Any] | None:
        return self.model.spec()


def init_state(cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], dict | None, bool]:
    """(state dict, conv groups, is a compress model file) from ``cfg.init``, read with
    weights_only; ValueError('init: ...') if the file is unusable or its layers have other names."""
    path = input_file(cfg.init or "", "init")
    if not path.is_file():
        raise ValueError(f"init: {cfg.init}: file not found (looked in {path.parent})")
    try:
        payload = load_checkpoint(path)
    except ArtifactError as exc:
        raise ValueError(f"init: {exc}") from None
    if is_model_payload(payload):
        spec = payload["spec"]
        if spec.get("arch") != cfg.model.arch:
            raise ValueError(
                f"init: {cfg.init} holds a {spec.get('arch')!r} model, but model.arch is {cfg.model.arch!r}"
            )
        return payload_state(payload), payload.get("groups"), True
    found = state_dict_in(payload)
    if found is None:
        keys = ", ".join(list(payload)[:6])
        raise ValueError(
            f"init: {cfg.init} holds no state dict (keys: {keys}); save one with "
            "torch.save(model.state_dict(), path) or give a checkpoint with 'model_state_dict'"
        )
    state, _ = found
    try:
        model = build_model({**cfg.model.spec(), **PLACEHOLDER_DATA})
    except ArtifactError as exc:
        raise ValueError(f"model: {exc}") from None
    names = set(model.state_dict())
    missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
    if missing or unexpected:
        shown = [f"{len(missing)} missing keys: {', '.join(missing[:5])}" if missing else ""]
        shown.append(f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:5])}" if unexpected else "")
        raise ValueError(
            f"init: {cfg.init} does not fit {cfg.model.label}: {'; '.join(s for s in shown if s)}"
        )
    return state, None, False


def _initialise(cfg: TrainConfig, model: nn.Module) -> None:
    """Load ``cfg.init`` into ``model``: a compress file may hold channel-pruned layers (they are
    resized); a user's state dict must fit the model exactly."""
    try:
        state, groups, ours = init_state(cfg)
    except ValueError as exc:  # the file changed since the pipeline was validated
        raise ArtifactError(f"stage {cfg.label!r}: {exc}") from None
    try:
        if ours:
            apply_state(model, state, groups)
        else:
            load_exact(model, state)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:600]
        raise ArtifactError(
            f"stage {cfg.label!r}: init: the weights in {cfg.init} do not fit the model: {first}"
        ) from None


def _check_outputs(cfg: TrainConfig, model: nn.Module, bundle) -> None:
    """The model must run on the data's images and give one logit per class (a user's factory or
    weights may not); an image folder's size is known only here, so this repeats ``check``."""
    example = bundle.normalize(bundle.train.x[:2])
    problem = forward_problem(model, example)
    if problem is not None:
        side = tuple(example.shape[1:])
        raise ArtifactError(
            f"stage {cfg.label!r}: {cfg.model.label} cannot run on the data's {side} images ({problem}); "
            "set data.image_size to a size it takes, or choose another model"
        )
    with torch.no_grad():
        out = model.eval()(example)
    if out.dim() != 2 or out.shape[1] != bundle.num_classes:
        raise ArtifactError(
            f"stage {cfg.label!r}: {cfg.model.label} outputs shape {tuple(out.shape)} for 2 images, but the "
            f"data has {bundle.num_classes} classes; it must output (batch, {bundle.num_classes}) logits"
        )


@stage("train", TrainConfig, version=2, distributed=True, concurrent=True)
def run(cfg: TrainConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    bundle = ctx.data()
    spec = {**cfg.model.spec(), **bundle.model_fields()}
    torch.manual_seed(ctx.seed)  # the initial weights depend on the seed alone, not on what ran before
    model = build_model(spec, pretrained=True)
    if cfg.init is not None:
        _initialise(cfg, model)
        ctx.log.info("train: initial weights from %s", cfg.init)
    _check_outputs(cfg, model, bundle)
    ctx.log.info(
        "train: %s%s, %d parameters, %d training / %d validation images, device %s",
        cfg.model.label,
        f" (width {cfg.model.width})" if cfg.model.arch in ("lenet300", "lenet5", "resnet20", "mlp") else "",
        count_parameters(model),
        len(bundle.train),
        len(bundle.val),
        ctx.device,
    )
    started = time.perf_counter()
    history, resumed, batchnorm, derived = [], 0, None, {}
    if cfg.epochs:
        settings = baseline_batch_size(cfg, len(bundle.train), cfg.label)
        run = FitSettings(
            settings, ctx.device, ctx.seed, out_dir / "work", desc=cfg.label, on_epoch=ctx.on_epoch
        )
        result, probe = fit_with_choice(model, bundle, run)
        history, resumed, batchnorm = result.history, result.resumed_from_epoch, result.batchnorm
        derived = {**result.derived, "batch_size_auto": cfg.batch_size is None}  # and lr auto's rate
        if probe is not None:
            derived["optimizer_probe"] = probe
    else:
        ctx.log.info("train: epochs 0: the weights in %s are taken as they are", cfg.init)
    wall = time.perf_counter() - started
    model.to(ctx.device)
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
        "resumed_from_epoch": resumed,
    }
    variant = Variant(
        name=cfg.output,
        format="torch",
        file=out_dir / "model.pt",
        stage=cfg.label,
        metrics=metrics,
        info={"arch": cfg.model.arch, "model": cfg.model.label, "spec": spec, "curves": "work/history.json"},
    )
    return StageResult(
        variants=[variant],
        metrics={"history": history, **metrics, "batchnorm": batchnorm, "training_settings": derived},
    )
