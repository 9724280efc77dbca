"""A search trial's recipe: which techniques run, in which order, with which settings, and the
chain of stages that builds it.

A recipe is a path through ``TECHNIQUES``: distil into a smaller student, prune channels
(``slim``), prune weights by magnitude (``prune``), then quantize for the runtime. Each
technique is one of our stages (distill, prune, quantize) run by the engine's step runner
(``ctx.run_step``) on the variant the step before it made, so a recipe is exactly what a user
could write as stages, and every step validates its settings with the stage's own schema.

Short trials train on the first ``train_images`` images of the seeded training split with at
most ``epochs`` epochs per training step; a full-budget build uses the technique's own settings
on all of them. Both score on validation data only (the step runner's dataset refuses the test
split).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from pydantic import Field, field_validator

from compress.config import StageConfig, StrictModel, split_path
from compress.context import Context, EpochHook
from compress.fileio import read_json, sha256_json, write_json
from compress.tuning.space import SpaceEntry
from compress.variants import Variant

# the order a chain runs in: each technique makes the next one's input
TECHNIQUES = ("distill", "slim", "prune", "quantize")
KIND = {"distill": "distill", "slim": "prune", "prune": "prune", "quantize": "quantize"}
# settings every step of that technique gets (a chain step makes one variant, no controls)
BASE: dict[str, dict[str, Any]] = {
    "distill": {"control": False, "seeds": 1, "output": "kd"},
    "slim": {"method": "structured", "output": "slim"},
    "prune": {"method": "magnitude", "output": "sparse"},
    "quantize": {"backend": "onnxruntime"},
}
# what is searched when a technique names no space of its own
DEFAULT_SPACE: dict[str, dict[str, dict[str, Any]]] = {
    "distill": {"student.width": {"choices": [0.25, 0.5]}},
    "slim": {"target_macs_reduction": {"low": 1.5, "high": 4.0}},
    "prune": {"amount": {"low": 0.5, "high": 0.97}},
    "quantize": {"mode": {"choices": ["dynamic", "static"]}},
}
QUANTIZE_MODES = ("dynamic", "static", "fp16")
SHORT_NAMES = {"distill": "kd", "slim": "slim", "prune": "sparse", "quantize": "int8"}


class TechniqueConfig(StrictModel):
    """One technique of the recipe: its stage's fixed settings, what is searched, and whether a
    trial may leave it out."""

    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="The technique's stage settings, as in that stage's YAML (distill, prune or quantize); "
        "e.g. {student: {arch: lenet5}, epochs: 6}.",
    )
    space: dict[str, SpaceEntry] | None = Field(
        None,
        description="Settings to search, by YAML path inside the stage (a range or choices; a list is "
        "choices); quantize: mode (dynamic, static, fp16). null: the technique's default space.",
        json_schema_extra=lambda schema: _list_is_choices_too(schema),  # _list_is_choices
    )
    optional: bool = Field(True, description="Trials may leave the technique out of the chain.")

    @field_validator("space", mode="before")
    @classmethod
    def _list_is_choices(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"choices": v} if isinstance(v, list) else v for k, v in value.items()}
        return value


def _list_is_choices_too(schema: dict[str, Any]) -> None:
    """Editors accept a plain list of choices for a searched setting, as the loader does."""
    for option in schema.get("anyOf", []):
        entry = option.get("additionalProperties")
        if option.get("type") == "object" and entry is not None:
            choices = {
                "type": "array",
                "minItems": 1,
                "items": {"anyOf": [{"type": t} for t in ("number", "string", "boolean", "null")]},
            }
            option["additionalProperties"] = {"anyOf": [entry, choices]}


class TrialBudget(StrictModel):
    """What a short trial trains on: the multi-fidelity's low rung."""

    train_images: int | None = Field(
        10_000,
        ge=100,
        le=100_000_000,
        description="The first N images of the seeded training split; null: all of them.",
    )
    epochs: int = Field(
        1, ge=1, le=1000, description="At most this many epochs per training step (distill, fine-tunes)."
    )
    full: list[Literal["distill", "slim", "prune", "quantize"]] = Field(
        default_factory=lambda: ["distill"],
        description="Techniques that trials run at full budget when they start the chain: each distinct "
        "setting is built once and shared by every trial and rebuild that starts with it.",
    )


@dataclass(frozen=True)
class Step:
    """One stage of a chain: the technique, the stage kind and its settings."""

    technique: str
    kind: str
    settings: dict[str, Any]
    short: bool = False  # on the trial budget (a subset, capped epochs); else its own settings


def space_of(techniques: dict[str, TechniqueConfig]) -> dict[str, SpaceEntry]:
    """The study's parameters: ``<technique>`` (in the chain or not) for optional techniques,
    and ``<technique>.<path>`` for each searched setting."""
    space: dict[str, SpaceEntry] = {}
    for name in TECHNIQUES:
        tech = techniques.get(name)
        if tech is None:
            continue
        if tech.optional:
            space[name] = SpaceEntry(choices=[True, False])
        for path, entry in effective_space(name, tech).items():
            space[f"{name}.{path}"] = entry
    return space


def design(techniques: dict[str, TechniqueConfig]) -> list[dict[str, Any]]:
    """One trial per combination of the techniques (in or out) and their choices, ranges at
    their middle, the empty chain (the parent itself) left out: the study's first trials.

    A sampler left alone on a small categorical space draws the same few chains again and
    again (a 16-trial NSGA-II study on MNIST drew the quarter-width student alone six times,
    and the fp32 parent four), so every kind of chain is scored once before the sampler
    refines the ranges around the best."""
    options: list[list[dict[str, Any]]] = []
    for name in TECHNIQUES:
        tech = techniques.get(name)
        if tech is None:
            continue
        space = effective_space(name, tech)
        first = {f"{name}.{p}": middle(e) for p, e in space.items()}
        ranges = {f"{name}.{p}": middle(e) for p, e in space.items() if e.choices is None}
        combos: list[dict[str, Any]] = [ranges]
        for path, entry in space.items():
            if entry.choices is not None:
                combos = [{**c, f"{name}.{path}": v} for c in combos for v in entry.choices]
        if tech.optional:
            combos = [{**c, name: True} for c in combos] + [{**first, name: False}]
        options.append(combos)
    trials: list[dict[str, Any]] = [{}]
    for combos in options:
        trials = [{**t, **c} for t in trials for c in combos]
    return [t for t in trials if any(t.get(name, True) for name in techniques if name in t)]


def middle(entry: SpaceEntry) -> Any:
    """A setting's representative value: its first choice, or the middle of its range."""
    return entry.choices[0] if entry.choices is not None else (entry.low + entry.high) / 2


def effective_space(name: str, tech: TechniqueConfig) -> dict[str, SpaceEntry]:
    if tech.space is not None:
        return tech.space
    return {path: SpaceEntry.model_validate(entry) for path, entry in DEFAULT_SPACE[name].items()}


def recipe(params: dict[str, Any], techniques: dict[str, TechniqueConfig]) -> list[Step]:
    """The chain a trial's parameters describe: the techniques in, in order, each with its
    stage settings (base, the user's, then the sampled values at their paths)."""
    steps = []
    for name in TECHNIQUES:
        tech = techniques.get(name)
        if tech is None or not params.get(name, True):
            continue
        settings = copy.deepcopy({**BASE[name], **tech.settings})
        for path in effective_space(name, tech):
            value = params[f"{name}.{path}"]
            if name == "quantize" and path == "mode":
                settings["modes"] = [value]
            else:
                _set_path(settings, path, value)
        if name == "quantize":
            settings.setdefault("modes", ["static"])
        steps.append(Step(name, KIND[name], settings))
    return steps


def describe(steps: list[Step]) -> str:
    """A recipe in a few words for logs and tables: ``kd w0.25 > sparse a0.93 > int8 static``."""
    if not steps:
        return "fp32 (no technique)"
    parts = []
    for step in steps:
        s = step.settings
        if step.technique == "distill":
            width = (s.get("student") or {}).get("width")
            parts.append("kd" + (f" w{width:g}" if isinstance(width, int | float) else ""))
        elif step.technique == "slim":
            parts.append(f"slim {s.get('target_macs_reduction', s.get('amount', '?')):.3g}x")
        elif step.technique == "prune":
            parts.append(f"sparse {s.get('amount', 0):.3g}")
        else:
            mode = s["modes"][0]
            parts.append(mode if mode == "fp16" else f"int8 {mode}")
    return " > ".join(parts)


def short_budget(steps: list[Step], budget: TrialBudget, configs: list[StageConfig]) -> list[Step]:
    """The steps with every training capped at ``budget.epochs`` epochs (``configs``: each step's
    validated config, whose effective epochs are capped)."""
    capped = []
    for step, cfg in zip(steps, configs, strict=True):
        if step.technique in budget.full:
            capped.append(step)
            continue
        settings = copy.deepcopy(step.settings)
        if step.kind == "distill" and cfg.epochs > budget.epochs:
            settings["epochs"] = budget.epochs
            settings.pop("warmup_epochs", None)
        finetune = getattr(cfg, "finetune", None)
        if step.kind == "prune" and finetune is not None and finetune.epochs > budget.epochs:
            section = settings.setdefault("finetune", {})
            if isinstance(section, dict):
                section["epochs"] = budget.epochs
                section.pop("warmup_epochs", None)
        qat = getattr(cfg, "qat", None)
        trains = {"qat", "auto"} & set(getattr(cfg, "modes", []))
        if step.kind == "quantize" and trains and qat is not None and qat.epochs > budget.epochs:
            settings.setdefault("qat", {})["epochs"] = budget.epochs
        capped.append(Step(step.technique, step.kind, settings, short=True))
    return capped


def run_chain(
    ctx: Context,
    steps: list[Step],
    parent: Variant,
    out_dir: Path,
    shared: Path,
    on_epoch: EpochHook | None = None,
    train_images: int | None = None,
) -> Variant:
    """Run ``steps`` in order from ``parent``, each on the variant the one before made; the last
    variant (the parent itself for an empty chain). Short steps train on the first
    ``train_images`` images. The chain's leading full-budget steps are built once into
    ``shared`` (by their settings and what they start from) and reused by every chain that
    starts the same way: four widths of student cost four distillations, not one per trial."""
    assert ctx.run_step is not None
    current, key = parent, parent.name
    for i, step in enumerate(steps):
        images = train_images if step.short else None
        if key is not None and not step.short:
            key = sha256_json({"from": key, "kind": step.kind, "settings": step.settings})[:16]
            current = _shared_step(ctx, step, current, shared / f"{step.technique}-{key}")
            continue
        key = None  # what follows a short step depends on the trial: not shared
        result = ctx.run_step(
            step.kind, step.settings, [current], out_dir / f"{i}-{step.technique}", on_epoch, images
        )
        current = _made(result, step)
    return current


def _shared_step(ctx: Context, step: Step, current: Variant, where: Path) -> Variant:
    """A full-budget step built once in ``where`` (its variant recorded in ``variant.json``).
    Workers sharing a study share the stage's directory: the first builds, the others wait."""
    record = where / "variant.json"
    where.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(where) + ".lock"):
        if record.is_file():
            return Variant.from_json(read_json(record), where)
        assert ctx.run_step is not None
        shutil.rmtree(where, ignore_errors=True)  # a build a killed run left half done
        made = _made(ctx.run_step(step.kind, step.settings, [current], where / "run"), step)
        write_json(record, made.to_json(where))
        return made


def _made(result: Any, step: Step) -> Variant:
    if not result.variants:
        raise StepMadeNothing(f"{step.technique} made no variant")
    return result.variants[-1]


class StepMadeNothing(Exception):
    """A chain step returned no variant (e.g. a quantize mode that refused the model)."""


def _set_path(settings: dict[str, Any], path: str, value: Any) -> None:
    parts = split_path(path)
    node = settings
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
