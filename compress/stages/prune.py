"""Stage ``prune``: global magnitude (unstructured) or channel (structured) pruning.

``magnitude`` zeroes the smallest weights across the chosen layers, one-shot or gradually
(Zhu & Gupta's cubic schedule, pruning events spread over a fine-tuning run), and saves
plain weights holding real zeros. ``structured`` removes whole channels and neurons with
torch-pruning's dependency graph, so the model is physically smaller; optional steps alternate
pruning and fine-tuning. This module checks the settings against the model and picks the
job; the jobs and their mechanics live in ``compress.pruning``.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from compress import pruning
from compress.config import (
    BN_ADAPT_BATCHES,
    MAX_BN_ADAPT_BATCHES,
    OptimizerConfig,
    SoftLabels,
    StageConfig,
    TrainingConfig,
)
from compress.context import Context
from compress.data import nominal_model_fields
from compress.distillation.teacher import Distillation, teacher_logits
from compress.errors import ConfigError
from compress.models import build_model, inspect
from compress.pruning.job import PruneJob, PruneProblem, model_name
from compress.pruning.magnitude_job import run_magnitude
from compress.pruning.probe import slim_problem
from compress.pruning.structured_job import run_structured, unreachable
from compress.stages import stage
from compress.variants import StageResult, Variant

MAGNITUDE_ONLY = ("exclude_classifier", "max_layer_sparsity", "layer_sparsity_limits", "ramp", "sensitivity")
STRUCTURED_ONLY = ("target_macs_reduction", "importance", "scope", "max_layer_amount", "round_to")
DEFAULT_AMOUNT = {"magnitude": 0.92, "structured": None}


def _default_finetune() -> TrainingConfig:
    return TrainingConfig(
        epochs=8,
        optimizer=OptimizerConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=5e-5),
        schedule="cosine",
    )


class PruneConfig(StageConfig):
    """Zero weights (magnitude) or remove whole channels (structured), then fine-tune."""

    stage: Literal["prune"] = Field(description="Prunes one variant: magnitude or structured.")
    tunable: ClassVar[bool] = True
    method: Literal["magnitude", "structured"] = Field(
        "magnitude", description="magnitude: zero the smallest weights; structured: remove whole channels."
    )
    output: str | None = Field(None, description="The variant's name; null: pruned (magnitude) or slim.")
    amount: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="magnitude: share of prunable weights set to zero; structured: share of channels "
        "removed; null: 0.92 (magnitude), or target_macs_reduction.",
    )
    target_macs_reduction: float | None = Field(
        None,
        gt=1,
        le=1000,
        description="structured: MACs before / after, e.g. 2.0 for half; null: 2.0 unless amount is given.",
    )
    schedule: Literal["oneshot", "cubic"] = Field(
        "cubic", description="cubic: sparsity grows gradually during fine-tuning; oneshot: one step."
    )
    steps: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Pruning events (magnitude) or prune-then-fine-tune rounds (structured); null: 12 for "
        "magnitude with cubic, else 1.",
    )
    ramp: float = Field(
        0.6,
        gt=0,
        le=1,
        description="magnitude: share of the fine-tuning epochs over which sparsity ramps up.",
    )
    layer_types: list[Literal["Linear", "Conv2d"]] = Field(
        default_factory=lambda: ["Linear", "Conv2d"],
        min_length=1,
        description="Layer types that may be pruned.",
    )
    exclude: list[str] = Field(default_factory=list, description="Layer names left whole.")
    exclude_classifier: bool = Field(False, description="magnitude: leave the final classifier dense.")
    max_layer_sparsity: float | None = Field(
        None, gt=0, le=1, description="magnitude: the highest sparsity of any one layer; null: no cap."
    )
    layer_sparsity_limits: dict[str, float] = Field(
        default_factory=dict,
        description="magnitude: the highest sparsity per layer name, e.g. {fc3: 0.8}.",
        json_schema_extra={"additionalProperties": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
    )
    importance: Literal["l1", "l2", "group_norm"] = Field(
        "group_norm",
        description="structured: channel importance, l1 or l2 of its own weights, or group_norm over the "
        "coupled group.",
    )
    # uniform: one searched ratio in every layer (the default with target_macs_reduction); global: one
    # ratio over one importance ranking (the default with amount); macs: importance per MAC saved
    scope: Literal["macs", "global", "uniform"] | None = Field(
        None,
        description="structured: uniform (one ratio in every layer), global (one importance ranking) or "
        "macs (importance per MAC saved); null: uniform for a MACs target, else global.",
    )
    max_layer_amount: float = Field(
        0.9, gt=0, lt=1, description="structured: the largest share of one layer's channels cut per step."
    )
    round_to: int | None = Field(
        None, ge=1, le=1024, description="structured: keep channel counts a multiple of this; null: any."
    )
    finetune: TrainingConfig | None = Field(
        default_factory=_default_finetune,
        description="Fine-tuning during and after pruning (keys as for train); null: prune without it.",
    )
    final_finetune: int = Field(
        0,
        ge=0,
        le=10_000,
        description="Extra epochs at full sparsity with a restarted learning-rate schedule; 0: none.",
    )
    # fine-tune against the unpruned input's soft labels as well as the hard labels
    distill: SoftLabels | None = Field(
        None,
        description="Fine-tune on the unpruned input's soft labels as well as the hard ones; null: off.",
    )
    # magnitude: each layer alone pruned to ``amount``, its validation drop (Distiller's analysis)
    sensitivity: bool = Field(
        False,
        description="magnitude: also prune each layer alone to amount and record its validation drop.",
    )
    # with finetune: null, BatchNorm statistics re-estimated on this many training batches after
    # the cut (a fine-tune re-estimates with its own finetune.bn_adapt_batches); 0: off
    bn_adapt_batches: int = Field(
        BN_ADAPT_BATCHES,
        ge=0,
        le=MAX_BN_ADAPT_BATCHES,
        description="With finetune: null, training batches that re-estimate BatchNorm statistics after the "
        "cut; 0: off.",
    )

    @model_validator(mode="after")
    def _defaults(self) -> PruneConfig:
        if self.amount is None and self.target_macs_reduction is None:
            if self.method == "magnitude":
                self.amount = DEFAULT_AMOUNT["magnitude"]
            else:
                self.target_macs_reduction = 2.0
        if self.steps is None:
            self.steps = 12 if self.method == "magnitude" and self.schedule == "cubic" else 1
        return self

    @property
    def output_name(self) -> str:
        return self.output or ("pruned" if self.method == "magnitude" else "slim")

    @property
    def channel_scope(self) -> str:
        """How channels are chosen: the given ``scope``, else ``uniform`` for a MACs target (it
        reaches every target the architecture allows and kept accuracy best, measured with
        ``compress.benchmarks.slim_scopes``) and ``global`` for an ``amount``."""
        return self.scope or ("uniform" if self.target_macs_reduction else "global")

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for every setting that cannot work, without needing the model."""
        found: list[tuple[str, str]] = []
        given = self.model_fields_set
        wrong = STRUCTURED_ONLY if self.method == "magnitude" else MAGNITUDE_ONLY
        for key in wrong:
            if key in given:
                found.append(
                    (key, f"only applies to method {'structured' if key in STRUCTURED_ONLY else 'magnitude'}")
                )
        if self.method == "structured" and "amount" in given and "target_macs_reduction" in given:
            found.append(("target_macs_reduction", "give either amount or target_macs_reduction, not both"))
        if self.scope == "macs" and self.target_macs_reduction is None:
            found.append(
                ("scope", "macs allocates channels for target_macs_reduction; with amount use global")
            )
        if self.schedule == "oneshot" and self.steps != 1:
            found.append(
                ("steps", f"schedule oneshot prunes in one step; got steps={self.steps} (use cubic)")
            )
        if self.method == "structured" and self.schedule == "cubic" and "schedule" in given:
            found.append(("schedule", "the cubic schedule is for magnitude; structured uses steps"))
        if self.method == "structured" and self.finetune is not None and self.finetune.epochs < self.steps:
            found.append(("finetune.epochs", f"must be >= steps ({self.steps}): each step fine-tunes"))
        for name, limit in self.layer_sparsity_limits.items():
            if not 0 < limit <= 1:
                found.append((f"layer_sparsity_limits.{name}", f"must be in (0, 1]; got {limit}"))
        if self.method == "magnitude" and self.finetune is None and self.steps > 1:
            found.append(("steps", "gradual pruning needs finetune: epochs to spread its steps over"))
        if self.final_finetune and self.finetune is None:
            found.append(("final_finetune", "needs a finetune: section for its optimizer settings"))
        if self.distill is not None and self.finetune is None:
            found.append(("distill", "distils during fine-tuning; it needs a finetune: section"))
        return found

    def check(self, pipeline) -> None:
        for key, message in self.problems():
            raise ValueError(f"{key}: {message}")
        if self.method == "structured":
            self._check_structured(pipeline)

    def _check_structured(self, pipeline) -> None:
        """An architecture channel pruning cannot handle (untraceable, or its cut copy fails to
        run or to rebuild), or a MACs target it cannot reach, fails now, before anything trains:
        neither depends on the weights (``compress.pruning.probe``)."""
        (source,) = self.consumes([])
        spec = pipeline.architecture_of(source, self)
        fields = nominal_model_fields(pipeline.data)
        if spec is None or fields is None:
            return  # known only when the stage runs (it checks again then)
        limit, problem = _probe(
            json.dumps({**spec, **fields}, sort_keys=True),
            tuple(self.exclude),
            tuple(self.layer_types),
            self.max_layer_amount,
            self.importance,
            self.round_to,
        )
        if problem is not None:
            raise ValueError(f"method: structured pruning of {model_name(spec)}: {problem}")
        target = self.target_macs_reduction
        if limit is not None and target is not None and limit < target:
            raise ValueError(f"target_macs_reduction: {unreachable(self, spec, limit)}")

    def architecture(self, variant: str, inputs: list[str], pipeline) -> dict | None:
        # magnitude pruning keeps every layer's shape; channel pruning's shapes depend on the weights
        return pipeline.architecture_of(inputs[0], self) if self.method == "magnitude" else None

    def consumes(self, available: list[str]) -> list[str]:
        names = list(self.from_) if self.from_ is not None else ["baseline"]
        if len(names) != 1:
            raise ValueError(f"from: the prune stage takes exactly one variant; got {len(names)}")
        return names

    def produces(self, inputs: list[str]) -> list[str]:
        return [self.output_name]


@functools.lru_cache(maxsize=32)
def _probe(
    spec_json: str,
    exclude: tuple[str, ...],
    layer_types: tuple[str, ...],
    max_layer_amount: float,
    importance: str,
    round_to: int | None,
) -> tuple[float | None, str | None]:
    """(the architecture's largest MACs reduction, why channel pruning cannot handle it) from an
    untrained model of ``spec_json``; (None, None) if it cannot be built or run here: the train
    stage's check reports that."""
    spec = json.loads(spec_json)
    try:
        torch.manual_seed(0)
        model = build_model(spec).eval()
        example = torch.randn(1, spec["in_channels"], spec["image_size"], spec["image_size"])
        classifier = inspect(model, example, spec["num_classes"]).classifier
    except Exception:  # noqa: BLE001 - any failure here is reported by the train stage, with context
        return None, None
    plan = pruning.ChannelPlan(
        importance=importance,
        scope="macs",
        max_layer_amount=max_layer_amount,
        ignored=[*([classifier] if classifier else []), *exclude],
        layer_types=list(layer_types),
        round_to=round_to,
    )
    return slim_problem(spec, model, example, plan)


def _fail(ctx: Context, cfg: PruneConfig, key: str, message: str) -> ConfigError:
    index = next((i for i, s in enumerate(ctx.pipeline.stages) if s.label == cfg.label), None)
    where = f"stages[{index}] ({cfg.label})" if index is not None else f"({cfg.label})"
    return ConfigError(f"{ctx.pipeline.path}: {where}.{key}: {message}")


@stage("prune", PruneConfig, version=2, distributed=True, concurrent=True)
def run(cfg: PruneConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    for key, message in cfg.problems():
        raise _fail(ctx, cfg, key, message)
    source = inputs[0]
    model, spec = source.load_torch()
    bundle = ctx.data()
    names = {n for n, _ in model.named_modules() if n}
    for key, listed in (("exclude", cfg.exclude), ("layer_sparsity_limits", list(cfg.layer_sparsity_limits))):
        for name in listed:
            if name not in names:
                raise _fail(
                    ctx,
                    cfg,
                    f"{key}",
                    f"no layer named {name!r} in {model_name(spec)}; layers: "
                    + _listed(
                        n
                        for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
                    ),
                )
    present = {type(m).__name__ for m in model.modules()}
    for kind in cfg.layer_types if "layer_types" in cfg.model_fields_set else ():
        if kind not in present:
            raise _fail(
                ctx,
                cfg,
                "layer_types",
                f"{model_name(spec)} has no {kind} layers; it has "
                + ", ".join(sorted(present & set(pruning.LAYER_TYPES))),
            )
    example = bundle.normalize(bundle.train.x[:1]).cpu()
    classifier = inspect(model, example, bundle.num_classes).classifier
    if classifier is None:
        ctx.log.warning(
            "%s: found no classifier layer (one output per class); no layer is kept whole", cfg.label
        )
    started, cpu_started = time.perf_counter(), time.process_time()
    if cfg.method == "magnitude":
        kept = [*cfg.exclude, *([classifier] if cfg.exclude_classifier and classifier else [])]
    else:
        kept = [*([classifier] if classifier else []), *cfg.exclude]
    job = PruneJob(
        cfg, source, model, spec, bundle, example, kept, _teacher(cfg, model, bundle, ctx), ctx, out_dir
    )
    try:
        result = run_magnitude(job) if cfg.method == "magnitude" else run_structured(job)
    except PruneProblem as exc:
        raise _fail(ctx, cfg, exc.key, str(exc)) from None
    except pruning.UntraceableModel as exc:
        raise _fail(ctx, cfg, "method", f"structured pruning of {model_name(spec)}: {exc}") from None
    variant = result.variants[0]
    variant.info["distill"] = cfg.distill.model_dump() if cfg.distill else None
    variant.metrics["prune_seconds"] = round(time.perf_counter() - started, 2)
    variant.metrics["prune_cpu_seconds"] = round(time.process_time() - cpu_started, 2)
    for key in ("prune_seconds", "prune_cpu_seconds"):
        result.metrics[key] = variant.metrics[key]
    return result


def _listed(names, limit: int = 20) -> str:  # noqa: ANN001 - any iterable of names
    names = list(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _teacher(cfg: PruneConfig, model: torch.nn.Module, bundle, ctx: Context) -> Distillation | None:
    """The unpruned input as the fine-tuning's teacher (``distill:``), or None without one.

    A frozen copy taken before any weight is removed; its logits are computed once when the
    fine-tuning does not augment (the teacher would see the same images every epoch).
    """
    if cfg.distill is None or cfg.finetune is None:
        return None
    teacher = copy.deepcopy(model)
    logits = teacher_logits(teacher, bundle, ctx.device) if cfg.finetune.augment == "none" else None
    return Distillation(teacher, cfg.distill.temperature, cfg.distill.alpha, logits)
