"""Stage ``search``: an Optuna study over whole compression recipes, scored on the shipped file.

Each trial builds a chain from the parent variant (distil into a student, prune channels,
prune weights, quantize: ``compress.tuning.recipe``), on a seeded subset with short training,
exports the result to ONNX and scores it in the ``runtime`` named (onnxruntime, ORT Mobile's
format or OpenVINO, converted as the export stage converts) on validation data (accuracy, p50
latency at ``batch_size`` on one thread, file bytes raw and gzip: ``compress.ship.score``).
The study is multi-objective (NSGA-II over the ``minimize`` metrics) with the accuracy drop
against the parent, measured the same way, as Optuna's constraint. The best feasible trials
per objective are rebuilt at full budget (``compress.tuning.picks``) and the first that holds
the constraint there ships as ``<output>.smallest`` / ``<output>.fastest``, a variant like any
other: exported, benchmarked, gated and reported.

The study machinery is the tune stage's (``compress.tuning``): an RDB storage that a killed
run resumes and ``--worker`` processes share, trials that fail with their reason recorded
while the study goes on, and a test split that raises when read.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from optuna.trial import FrozenTrial
from pydantic import Field, PrivateAttr, field_validator, model_validator

from compress import measure
from compress.config import StageConfig
from compress.context import Context
from compress.errors import ArtifactError, ConfigError
from compress.fileio import sha256_file, sha256_json, write_json
from compress.ship import score as runtime_score
from compress.ship.targets.registry import RUNTIMES as TARGET_OF
from compress.ship.targets.registry import install_hint, missing_packages
from compress.stages import stage
from compress.tuning import recipe as chain
from compress.tuning.constraint import ConstraintConfig
from compress.tuning.objective import TrialRejected
from compress.tuning.picks import PURPOSE, build_picks
from compress.tuning.refine import DESIGN_ATTR
from compress.tuning.settings import step_config
from compress.tuning.space import SpaceEntry
from compress.tuning.storage import study_url
from compress.tuning.study import opened_study, optimize
from compress.tuning.study_fields import StudyFields
from compress.tuning.summary import stage_metrics, summarize, trials_frame
from compress.variants import StageResult, Variant


class SearchConfig(StageConfig, StudyFields):
    """An Optuna study over compression recipes (distil, prune, quantize), scored in the runtime."""

    stage: Literal["search"] = Field(description="Searches whole compression recipes with Optuna.")
    techniques: dict[Literal["distill", "slim", "prune", "quantize"], chain.TechniqueConfig] = Field(
        min_length=1,
        description="The techniques a recipe may chain, in the order distill, slim, prune, quantize; a "
        "list of names takes each one's default space.",
        json_schema_extra=lambda schema: _mapping_or_names(schema),  # _names_take_defaults
    )
    runtime: str = Field(
        "onnxruntime",
        description="Where each trial's file is scored: onnxruntime, ort (ORT Mobile's format) or "
        "openvino, each converted as the export stage converts it.",
        json_schema_extra={"enum": list(runtime_score.RUNTIMES)},
    )
    batch_size: int = Field(64, gt=0, le=65536, description="Batch size of the timed calls.")
    threads: int = Field(1, ge=1, le=256, description="The runtime's intra-op threads while timing.")
    minimize: list[Literal["gzip_bytes", "file_bytes", "latency_ms"]] = Field(
        default_factory=lambda: ["gzip_bytes", "latency_ms"],
        min_length=1,
        max_length=3,
        description="The objectives: gzip_bytes, file_bytes, latency_ms; each gets its own shipped pick.",
        json_schema_extra={"uniqueItems": True},
    )
    max_drop_pp: float = Field(
        0.3, ge=0, le=100, description="Largest validation-accuracy drop against the parent, in pp."
    )
    trial_slack_pp: float = Field(
        0.3,
        ge=0,
        le=100,
        description="Extra drop a short trial may have and still be a candidate for a full-budget rebuild.",
    )
    trial_budget: chain.TrialBudget = Field(
        chain.TrialBudget(), description="Short trials: training images and epochs per training step."
    )
    rebuilds: int = Field(
        2, ge=1, le=20, description="Full-budget rebuilds per objective, best candidate first."
    )
    output: str = Field("search", description="Prefix of the shipped variants: <output>.smallest, .fastest.")
    n_trials: int = Field(12, ge=1, le=100_000, description="Finished trials the study ends at.")

    supports_workers: ClassVar[bool] = True
    # read by the study machinery (compress.tuning.spec.SearchSpec)
    variant: ClassVar[None] = None
    trial_overrides: ClassVar[dict[str, Any]] = {}
    enqueue_default: ClassVar[bool] = False
    pruner: ClassVar[str] = "none"
    selection: ClassVar[str] = "smallest_within_tolerance"
    primary: ClassVar[int] = 0
    target_config: ClassVar[None] = None
    _parent: str | None = PrivateAttr(None)

    @field_validator("techniques", mode="before")
    @classmethod
    def _names_take_defaults(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {name: {} for name in value}
        return {k: ({} if v is None else v) for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("runtime")
    @classmethod
    def _reads_the_onnx_file(cls, value: str) -> str:
        if value in runtime_score.RUNTIMES:
            target = TARGET_OF[value]
            missing = missing_packages(target, running_only=False) if target.extra else []
            if missing:
                raise ValueError(
                    f"{value!r} needs {', '.join(missing)}, which is not installed: {install_hint(target)}"
                )
            return value
        if value in TARGET_OF:
            raise ValueError(
                f"{value!r} converts the PyTorch model and ships fp32 only, so a recipe ending in "
                f"int8 has no file there; score in one of {', '.join(runtime_score.RUNTIMES)}"
            )
        raise ValueError(f"{value!r} is not a runtime; one of {', '.join(runtime_score.RUNTIMES)}")

    @model_validator(mode="after")
    def _unique(self) -> SearchConfig:
        if len(set(self.minimize)) != len(self.minimize):
            raise ValueError("minimize: the same metric appears twice")
        if len({PURPOSE[m] for m in self.minimize}) != len(self.minimize):
            raise ValueError("minimize: gzip_bytes and file_bytes both name the smallest file; keep one")
        return self

    # ------------------------------------------------------------ what the study machinery reads

    @property
    def target(self) -> str:
        return "the recipe"

    @property
    def space(self) -> dict[str, SpaceEntry]:
        return chain.space_of(self.techniques)

    @property
    def constraint(self) -> ConstraintConfig:
        return ConstraintConfig(max_drop_pp=self.max_drop_pp, trial_slack_pp=self.trial_slack_pp)

    @property
    def confirm(self) -> int:
        return self.rebuilds

    @property
    def metrics(self) -> list[str]:
        return list(self.minimize)

    @property
    def directions(self) -> list[str]:
        return ["minimize"] * len(self.minimize)

    def against(self) -> str | None:
        return self._parent or (self.from_[0] if self.from_ else "baseline")

    def selection_rule(self) -> str:
        return (
            f"per objective ({', '.join(self.minimize)}), the feasible trials best first (validation "
            f"accuracy in {self.runtime} at most {self.max_drop_pp} pp below the parent's, with "
            f"{self.trial_slack_pp} pp slack on the short budget), rebuilt at full budget up to "
            f"{self.rebuilds} each; the first within {self.max_drop_pp} pp there ships"
        )

    # ------------------------------------------------------------ checks against the pipeline

    def consumes(self, available: list[str]) -> list[str]:
        parents = list(self.from_) if self.from_ is not None else ["baseline"]
        if len(parents) != 1:
            raise ValueError(f"from: a search starts from exactly one variant, got {len(parents)}")
        if self.from_ is None and "baseline" not in available:
            raise ValueError("from: no 'baseline' variant to search from; name the parent variant")
        self._parent = parents[0]
        return parents

    def produces(self, inputs: list[str]) -> list[str]:
        return [f"{self.output}.{PURPOSE[m]}" for m in self.minimize]

    def check(self, pipeline: Any) -> None:
        """Each technique's settings, with each end of each searched range, must be settings its
        stage takes: a refused value is named here, before anything trains."""
        from compress.stages import config_registry

        classes = config_registry()
        parent = (self.from_ or ["baseline"])[0]
        for name, tech in self.techniques.items():
            space = chain.effective_space(name, tech)
            base = {f"{name}.{p}": chain.middle(e) for p, e in space.items()}
            tries = [
                (f"space.{path}", {**base, f"{name}.{path}": value}, value)
                for path, entry in space.items()
                for value in (entry.choices if entry.choices is not None else [entry.low, entry.high])
            ]
            for where, params, value in tries or [("settings", {}, None)]:
                (step,) = chain.recipe(params, {name: tech})
                try:
                    step_config(classes[step.kind], _with_student(step, pipeline, parent, self), [parent])
                except ValueError as exc:
                    refused = f" {value!r} is not a setting the {step.kind} stage takes:" if tries else ""
                    raise ValueError(f"techniques.{name}.{where}:{refused} {exc}") from None

    def cache_extras(self, pipeline: Any) -> dict[str, Any]:
        return {"space": {k: v.model_dump(mode="json") for k, v in self.space.items()}}


def _mapping_or_names(schema: dict[str, Any]) -> None:
    """Editors accept the short form, a list of technique names, as the loader does."""
    mapping = {k: schema.pop(k) for k in ("type", "additionalProperties", "minProperties", "propertyNames")}
    names = {"type": "array", "items": {"enum": list(chain.TECHNIQUES)}, "minItems": 1, "uniqueItems": True}
    schema["anyOf"] = [mapping, names]


def _with_student(step: chain.Step, pipeline: Any, parent: str, cfg: SearchConfig) -> dict[str, Any]:
    """A distill step without a student distils into the parent's own architecture (the space
    then varies its width)."""
    settings = dict(step.settings)
    if step.kind != "distill":
        return settings
    student = dict(settings.get("student") or {})
    if "arch" not in student and "torchvision" not in student and "timm" not in student:
        spec = pipeline.architecture_of(parent, cfg) if hasattr(pipeline, "architecture_of") else None
        spec = spec or {}
        student = {
            k: v for k, v in spec.items() if k in ("arch", "width", "hidden", "torchvision", "timm")
        } | student
        settings["student"] = student
    return settings


# ---------------------------------------------------------------- the stage


@stage("search", SearchConfig, version=1, concurrent=True)
def run(cfg: SearchConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    if ctx.run_step is None:
        raise ArtifactError("the search stage needs the engine's step runner (ctx.run_step)")
    started = time.perf_counter()
    private = cfg.private_storage(ctx.worker)
    parent = inputs[0]
    cfg._parent = parent.name
    bundle = ctx.data()
    test_reads_before = bundle.test_reads
    reference = runtime_score.score(
        parent, bundle, out_dir / "parent", cfg.batch_size, cfg.threads, cfg.runtime
    )
    ctx.log.info(
        "%s: %s in %s: val accuracy %.4f, %.3f ms at batch %d, %s bytes (gzip %s)",
        cfg.label,
        parent.name,
        cfg.runtime,
        reference["val_accuracy"],
        reference["latency_ms"],
        cfg.batch_size,
        f"{reference['file_bytes']:,}",
        f"{reference['gzip_bytes']:,}",
    )
    techniques = _resolved_techniques(cfg, ctx)
    url, shown_url = study_url(cfg.storage, out_dir)
    study_name = cfg.study_name or _default_study_name(cfg, parent, ctx)
    evaluate = _trial_evaluator(cfg, techniques, parent, ctx, out_dir / "shared")
    with opened_study(url, shown_url, study_name, cfg, ctx, private) as (study, _lock):
        with _lock:
            if not study.trials:
                for params in chain.design(techniques)[: cfg.n_trials]:
                    study.enqueue_trial(params, user_attrs={DESIGN_ATTR: True})
        optimize(study, _lock, cfg, ctx, out_dir, reference["val_accuracy"], started, evaluate, refine=True)
        summary = summarize(study, cfg, reference["val_accuracy"], study_name, shown_url, started)
        picks, builds = [], {}
        if not ctx.worker:
            picks, builds = build_picks(
                study,
                cfg.metrics,
                cfg.constraint,
                reference["val_accuracy"],
                cfg.rebuilds,
                _rebuilder(cfg, techniques, parent, ctx, out_dir / "shared"),
                out_dir / "builds",
                ctx,
                cfg.label,
            )
    if not cfg.keep_trials:
        shutil.rmtree(out_dir / "trials", ignore_errors=True)
    test_reads = bundle.test_reads - test_reads_before
    if test_reads:
        raise RuntimeError(f"the test split was read {test_reads} times during the search")
    variants = _shipped(cfg, parent, picks, builds, ctx)
    _say_outcome(cfg, ctx, picks, summary)
    summary.update(
        reference={"variant": parent.name, **reference},
        picks=picks,
        builds=[b.as_json() for b in builds.values()],
        test_reads_during_tuning=test_reads,
        elapsed_seconds=round(time.perf_counter() - started, 2),
    )
    write_json(out_dir / "study.json", summary)
    trials_frame(summary).to_csv(out_dir / "trials.csv", index=False)
    metrics = stage_metrics(summary, cfg, reference["val_accuracy"], test_reads)
    metrics.update({f"pick.{p['purpose']}": p["trial"] for p in picks})
    return StageResult(
        variants=variants,
        metrics=metrics,
        publish={"study.json": f"{cfg.label}.study.json", "trials.csv": f"{cfg.label}.trials.csv"},
    )


def _resolved_techniques(cfg: SearchConfig, ctx: Context) -> dict[str, chain.TechniqueConfig]:
    """The techniques with a distill step's student filled in from the parent's architecture."""
    resolved = dict(cfg.techniques)
    if "distill" in resolved:
        tech = resolved["distill"]
        step = chain.Step("distill", "distill", dict(tech.settings))
        settings = _with_student(step, ctx.pipeline.config, cfg.against() or "baseline", cfg)
        resolved["distill"] = tech.model_copy(update={"settings": settings})
    return resolved


def _steps(cfg: SearchConfig, techniques: dict, params: dict[str, Any], ctx: Context, short: bool) -> list:
    from compress.stages import config_registry

    steps = chain.recipe(params, techniques)
    if not short:
        return steps
    classes = config_registry()
    configs = [step_config(classes[s.kind], s.settings, ["parent"]) for s in steps]
    return chain.short_budget(steps, cfg.trial_budget, configs)


def _trial_evaluator(cfg: SearchConfig, techniques: dict, parent: Variant, ctx: Context, shared: Path):
    """One trial: the sampled chain on the short budget, scored in the runtime."""

    seen: dict[str, tuple[Variant, dict[str, Any]]] = {}  # chain -> its score, this process

    def evaluate(params: dict[str, Any], trial_dir: Path, on_epoch: Any) -> tuple[Variant, dict[str, Any]]:
        try:
            steps = _steps(cfg, techniques, params, ctx, short=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # a sampler that draws a chain again (the settings of a technique left out differ, or
        # a small categorical space) gets its score, not a second identical run
        key = sha256_json([dataclasses.asdict(step) for step in steps])
        if key in seen:
            variant, metrics = seen[key]
            return variant, {**metrics, "repeat_of_chain": True}
        try:
            final = chain.run_chain(
                ctx, steps, parent, trial_dir, shared, on_epoch, cfg.trial_budget.train_images
            )
            metrics = runtime_score.score(
                final, ctx.data(), trial_dir / "scored", cfg.batch_size, cfg.threads, cfg.runtime
            )
        except (ConfigError, TrialRejected):
            raise
        except Exception as exc:  # the architecture refused a step, an export failed: record, go on
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TrialRejected(f"{chain.describe(steps)}: {type(exc).__name__}: {first}") from None
        metrics["recipe"] = chain.describe(steps)
        seen[key] = (final, metrics)
        return final, metrics

    return evaluate


def _rebuilder(cfg: SearchConfig, techniques: dict, parent: Variant, ctx: Context, shared: Path):
    """A candidate's chain at full budget (each technique's own settings, every training image)."""

    def rebuild(trial: FrozenTrial, out: Path) -> tuple[Variant, dict[str, Any], str]:
        steps = _steps(cfg, techniques, dict(trial.params), ctx, short=False)
        final = chain.run_chain(ctx, steps, parent, out, shared)
        metrics = runtime_score.score(
            final, ctx.data(), out / "scored", cfg.batch_size, cfg.threads, cfg.runtime
        )
        return final, metrics, chain.describe(steps)

    return rebuild


def _shipped(
    cfg: SearchConfig, parent: Variant, picks: list[dict], builds: dict, ctx: Context
) -> list[Variant]:
    """The picks as variants, each with its test accuracy in the runtime: measured once the
    study and its rebuilds are over, as every stage measures what it makes. A recipe picked for
    two objectives ships once, under the first one's name (``pick["shipped_as"]``): exporting and
    benchmarking the same file twice would only cost time."""
    variants = []
    named: dict[int, str] = {}
    for pick in picks:
        if pick["trial"] is None:
            continue
        if pick["trial"] in named:
            pick["shipped_as"] = named[pick["trial"]]
            continue
        named[pick["trial"]] = pick["shipped_as"] = f"{cfg.output}.{pick['purpose']}"
        build = builds[pick["trial"]]
        made: Variant = build.variant
        runtime = {f"search_{k}": v for k, v in build.metrics.items() if k in ("val_accuracy", "latency_ms")}
        if "test_accuracy" not in build.metrics:
            bundle = ctx.data()
            _, run = runtime_score.loaded(made, bundle, Path(made.file).parent / "scored", cfg.runtime)
            build.metrics["test_accuracy"] = measure.accuracy_of(run, bundle, bundle.test)["accuracy"]
        runtime["test_accuracy"] = build.metrics["test_accuracy"]
        variants.append(
            Variant(
                name=f"{cfg.output}.{pick['purpose']}",
                format=made.format,
                file=made.file,
                stage=cfg.label,
                parent=parent.name,
                metrics={**made.metrics, **runtime, "recipe": build.recipe, "search_trial": build.number},
                info={**made.info, "recipe": build.recipe, "search_trial": build.number},
            )
        )
    return variants


def _say_outcome(cfg: SearchConfig, ctx: Context, picks: list[dict], summary: dict[str, Any]) -> None:
    for pick in picks:
        if pick["trial"] is None:
            ctx.log.warning(
                "%s: no recipe kept validation accuracy within %s pp of the parent at full budget for "
                "%s (%d feasible short trials of %d); %s.%s is not shipped",
                cfg.label,
                cfg.max_drop_pp,
                pick["metric"],
                summary["feasible"],
                summary["counts"].get("COMPLETE", 0),
                cfg.output,
                pick["purpose"],
            )
        else:
            ctx.log.info(
                "%s: %s: trial %d, shipped as %s",
                cfg.label,
                pick["purpose"],
                pick["trial"],
                pick["shipped_as"],
            )


def _default_study_name(cfg: SearchConfig, parent: Variant, ctx: Context) -> str:
    """Same search on the same parent -> same study; n_trials and timeout may grow a study."""
    identity = {
        "search": cfg.model_dump(
            mode="json",
            by_alias=True,
            exclude={"storage", "n_trials", "timeout", "study_name", "keep_trials", "rebuilds"},
        ),
        "parent": sha256_file(parent.file),
        "seed": ctx.seed,
        "data": ctx.pipeline.config.data.model_dump(mode="json", exclude={"root", "download"}),
    }
    return f"{ctx.pipeline.name}.{cfg.label}.{sha256_json(identity)[:10]}"
