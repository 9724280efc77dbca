"""Stage ``tune``: an Optuna study over another stage's settings, scored on validation data.

The tune stage comes before its target in the pipeline. Each trial runs the target stage
(through ``ctx.run_stage``, handed in by the engine) with sampled settings and the short
``trial_overrides`` budget, on a dataset whose test split raises when read; the objectives are
metrics of the variant the target makes, and the accuracy constraint goes through Optuna's
constraints API, so infeasible trials are recorded but never chosen. The chosen settings go
back to the engine as ``StageResult.overrides``, and the target then runs once with its full
budget, the tuned values in its config and cache key.

Studies live in an RDB storage opened with ``load_if_exists``: by default an SQLite file in
this stage's work directory (kept by the engine when the process dies, so a re-run resumes);
with ``storage:``/``--storage`` any SQLAlchemy URL, shared by ``--worker`` processes. A lock
around "count trials, start one" keeps the number of finished trials at exactly ``n_trials``,
and heartbeats turn the trials of killed workers into retries.

This module is the stage: its config and a ``run`` that wires the machinery of
``compress.tuning`` (space, study, objective, confirmation, selection, summary).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from compress.config import StageConfig, did_you_mean
from compress.context import Context
from compress.errors import ArtifactError, ConfigError
from compress.fileio import sha256_file, sha256_json, write_json
from compress.stages import stage
from compress.tuning.confirm import confirm
from compress.tuning.constraint import ConstraintConfig
from compress.tuning.settings import with_settings
from compress.tuning.space import SpaceEntry, kind_of
from compress.tuning.storage import study_url
from compress.tuning.study import opened_study, optimize
from compress.tuning.study_fields import StudyFields
from compress.tuning.summary import stage_metrics, summarize, trials_frame
from compress.variants import StageResult, Variant


class TuneConfig(StageConfig, StudyFields):
    """An Optuna study over a later stage's settings, scored on validation data only."""

    stage: Literal["tune"] = Field(description="Tunes a later stage's settings with an Optuna study.")
    target: str = Field(description="The stage to tune, by name: a later train, prune, distill or quantize.")
    space: dict[str, SpaceEntry] = Field(
        min_length=1,
        description="Settings to search, by YAML path inside the target (e.g. finetune.optimizer.lr): "
        "a range or a list of choices each.",
    )
    trial_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Fixed settings for trials only, by YAML path, e.g. {finetune.epochs: 2}.",
    )
    objectives: list[dict[Literal["maximize", "minimize"], str]] = Field(
        min_length=1,
        max_length=4,
        description="What to optimise, each 'maximize: METRIC' or 'minimize: METRIC' of the target's "
        "variant, e.g. [maximize: sparsity].",
        json_schema_extra={  # _one_direction_each
            "items": {
                "type": "object",
                "propertyNames": {"enum": ["maximize", "minimize"]},
                "additionalProperties": {"type": "string"},
                "minProperties": 1,
                "maxProperties": 1,
            }
        },
    )
    variant: str | None = Field(
        None, description="The target's variant the objectives score; null: its only variant."
    )
    constraint: ConstraintConfig | None = Field(
        None, description="The tolerable loss; trials outside it are recorded, never chosen; null: none."
    )
    pruner: Literal["none", "median", "hyperband"] = Field(
        "none", description="Stop poor trials early on per-epoch validation accuracy (one objective only)."
    )
    selection: Literal["smallest_within_tolerance", "best"] = Field(
        "smallest_within_tolerance",
        description="smallest_within_tolerance: the feasible Pareto-optimal trial best on the first "
        "objective that is not the constraint's metric; best: the first objective.",
    )
    enqueue_default: bool = Field(True, description="Trial 0 tries the target's own settings.")
    # Re-run the best N candidates with the target's full budget (validation data only) and
    # choose the first that meets the constraint there.
    confirm: int = Field(
        0,
        ge=0,
        le=20,
        description="Full-budget re-runs of up to this many candidates, best first; the first that meets "
        "the constraint is chosen; 0: none.",
    )

    supports_workers: ClassVar[bool] = True
    _target: StageConfig | None = PrivateAttr(None)
    _inputs: list[str] | None = PrivateAttr(None)

    @field_validator("objectives")
    @classmethod
    def _one_direction_each(cls, value: list[dict[str, str]]) -> list[dict[str, str]]:
        for item in value:
            if len(item) != 1:
                raise ValueError("each objective is one 'maximize: METRIC' or 'minimize: METRIC'")
        metrics = [m for item in value for m in item.values()]
        if len(set(metrics)) != len(metrics):
            raise ValueError("the same metric appears twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        if self.from_ is not None:
            raise ValueError("from: a tune stage reads its target's inputs; remove 'from:'")
        if self.confirm and self.constraint is None:
            raise ValueError("confirm: re-checks the constraint at full budget; add a constraint:")
        if self.constraint is not None and self.constraint.trial_slack_pp and not self.confirm:
            raise ValueError(
                "constraint.trial_slack_pp admits settings that may miss the tolerance at full budget; "
                "set confirm: N (e.g. 1) so the chosen one is re-checked"
            )
        if self.pruner != "none" and len(self.objectives) > 1:
            raise ValueError("pruner: Optuna cannot prune multi-objective trials; use pruner: none")
        if self.sampler == "nsga2" and len(self.objectives) == 1 and self.constraint is None:
            pass  # allowed, if unusual
        return self

    # ------------------------------------------------------------ derived settings

    @property
    def directions(self) -> list[str]:
        return [next(iter(item)) for item in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [next(iter(item.values())) for item in self.objectives]

    @property
    def primary(self) -> int:
        """Index of the objective the selection rule ranks the feasible Pareto front by."""
        if self.selection == "best" or self.constraint is None:
            return 0
        return next((i for i, m in enumerate(self.metrics) if m != self.constraint.metric), 0)

    @property
    def target_config(self) -> StageConfig | None:
        """The target stage's validated config, once ``check`` has seen the pipeline."""
        return self._target

    def selection_rule(self) -> str:
        feasible = (
            f"meeting the constraint ({self.constraint.metric} at most {self.constraint.max_drop_pp}"
            f"{'% relative' if self.constraint.relative else ' pp'} below the reference)"
            if self.constraint
            else "(no constraint: every complete trial is feasible)"
        )
        if len(self.objectives) == 1:
            return (
                f"the complete trial {feasible} with the best {self.directions[0]}d {self.metrics[0]}; "
                "ties go to the earlier trial"
            )
        i = self.primary
        return (
            f"{self.selection}: among the Pareto-optimal trials {feasible}, the one with the best "
            f"{self.directions[i]}d {self.metrics[i]}; ties go to the other objectives in order, "
            "then to the earlier trial"
        )

    # ------------------------------------------------------------ checks against the pipeline

    def check(self, pipeline: Any) -> None:
        stages = pipeline.stages
        labels = [s.label for s in stages]
        me = labels.index(self.label) if self.label in labels else -1
        if self.target not in labels:
            raise ValueError(
                f"target: no stage named {self.target!r}{did_you_mean(self.target, labels)}; "
                f"stages: {', '.join(labels)}"
            )
        where = labels.index(self.target)
        target = stages[where]
        if getattr(target, "supports_workers", False):
            raise ValueError("target: a tune stage cannot tune another tune stage")
        if not target.tunable:
            raise ValueError(
                f"target: stage {self.target!r} ({target.stage}) has no tunable settings; a tune stage "
                "can target train, prune, distill or quantize stages"
            )
        if where <= me:
            raise ValueError(
                f"target: stage {self.target!r} must come after the tune stage (tune runs first and "
                "hands its choice to the target)"
            )
        available: list[str] = []
        for earlier in stages[: max(me, 0)]:
            available += earlier.produces(earlier.consumes(list(available)))
        needed = target.consumes(list(available))
        missing = [n for n in needed if n not in available]
        if missing:
            raise ValueError(
                f"target: stage {self.target!r} reads {', '.join(missing)}, which is made after the "
                "tune stage; move the tune stage after the stage that makes it"
            )
        if self.constraint is not None:
            against = self.constraint.against or (needed[0] if needed else None)
            if against is None:
                raise ValueError("constraint.against: name the variant whose accuracy is the reference")
            if against not in available:
                raise ValueError(
                    f"constraint.against: no variant {against!r} before the tune stage"
                    f"{did_you_mean(against, available)}; available: {', '.join(available) or 'none'}"
                )
        try:
            with_settings(target, self.trial_overrides, pipeline, where="trial_overrides: ")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        for path, entry in self.space.items():
            kind = kind_of(path, entry, target)
            ends = entry.choices if entry.choices is not None else [entry.low, entry.high]
            for value in ends:
                value = int(value) if kind == "int" else float(value) if kind == "float" else value
                try:
                    with_settings(target, {**self.trial_overrides, path: value}, pipeline)
                except ValueError as exc:
                    raise ValueError(
                        f"space.{path}: {value!r} is not a valid setting of stage {self.target!r}: {exc}"
                    ) from None
        self._target, self._inputs = target, needed

    def consumes(self, available: list[str]) -> list[str]:
        names = list(self._inputs or [])
        if self.constraint is not None and self.constraint.against and self.constraint.against not in names:
            names.append(self.constraint.against)
        return names

    def cache_extras(self, pipeline: Any) -> dict[str, Any]:
        """The target's own config is part of what a study found: editing it re-tunes."""
        target = self._target or next(s for s in pipeline.stages if s.label == self.target)
        return {"target": target.model_dump(mode="json", by_alias=True)}

    def against(self) -> str | None:
        if self.constraint is None:
            return None
        return self.constraint.against or (self._inputs[0] if self._inputs else None)


# ---------------------------------------------------------------- the stage


@stage("tune", TuneConfig, version=3)
def run(cfg: TuneConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    if ctx.run_stage is None:
        raise ArtifactError("the tune stage needs the engine's stage runner (ctx.run_stage)")
    started = time.perf_counter()
    private = cfg.private_storage(ctx.worker)
    url, shown_url = study_url(cfg.storage, out_dir)
    study_name = cfg.study_name or _default_study_name(cfg, inputs, ctx)
    reference = _reference(cfg, ctx)
    bundle = ctx.data()
    test_reads_before = bundle.test_reads

    with opened_study(url, shown_url, study_name, cfg, ctx, private) as (study, lock):
        optimize(study, lock, cfg, ctx, out_dir, reference, started)
        summary = summarize(study, cfg, reference, study_name, shown_url, started)
        if cfg.confirm and not ctx.worker:  # workers only fill the study; the run that applies it confirms
            confirm(study, summary, cfg, ctx, out_dir, reference)
            summary["elapsed_seconds"] = round(time.perf_counter() - started, 2)

    if not cfg.keep_trials:
        shutil.rmtree(out_dir / "trials", ignore_errors=True)
    test_reads = bundle.test_reads - test_reads_before
    summary["test_reads_during_tuning"] = test_reads
    if test_reads:
        raise RuntimeError(f"the test split was read {test_reads} times during tuning")
    write_json(out_dir / "study.json", summary)
    trials_frame(summary).to_csv(out_dir / "trials.csv", index=False)
    chosen = summary["chosen"]
    if chosen:
        ctx.log.info(
            "%s: chose trial %d (%s): %s",
            cfg.label,
            chosen["number"],
            ", ".join(f"{m} {v:.6g}" for m, v in zip(cfg.metrics, chosen["values"], strict=True)),
            ", ".join(f"{k}={v!r}" for k, v in chosen["params"].items()),
        )
    else:
        why = (
            f"none of the {len(summary['confirmation']['runs'])} candidate(s) met the constraint at "
            "full budget"
            if summary.get("confirmation", {}).get("runs")
            else f"no feasible trial among {summary['counts'].get('COMPLETE', 0)}"
        )
        ctx.log.warning("%s: %s; %s keeps its own settings", cfg.label, why, cfg.target)
    return StageResult(
        metrics=stage_metrics(summary, cfg, reference, test_reads),
        publish={"study.json": f"{cfg.label}.study.json", "trials.csv": f"{cfg.label}.trials.csv"},
        overrides={cfg.target: dict(chosen["params"])} if chosen else {},
    )


def _default_study_name(cfg: TuneConfig, inputs: list[Variant], ctx: Context) -> str:
    """Same search on the same inputs -> same study; n_trials and timeout may grow a study."""
    identity = {
        "tune": cfg.model_dump(
            mode="json",
            by_alias=True,
            exclude={"storage", "n_trials", "timeout", "study_name", "selection", "keep_trials"},
        ),
        "target": cfg.cache_extras(ctx.pipeline.config),
        "inputs": {v.name: sha256_file(v.file) for v in inputs},
        "seed": ctx.seed,
        "data": ctx.pipeline.config.data.model_dump(mode="json", exclude={"root", "download"}),
    }
    return f"{ctx.pipeline.name}.{cfg.label}.{sha256_json(identity)[:10]}"


def _reference(cfg: TuneConfig, ctx: Context) -> float | None:
    if cfg.constraint is None:
        return None
    name, metric = cfg.against(), cfg.constraint.metric
    variant = ctx.variants.get(name) if name else None
    value = variant.metrics.get(metric) if variant else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(
            f"stage {cfg.label!r}: constraint.metric {metric!r} is not measured on variant {name!r} "
            f"(its metrics: {', '.join(sorted(variant.metrics)) if variant else 'none'})"
        )
    return float(value)
