"""Stage ``gates``: quality gates over the benchmark table, for CI.

Each rule names one gate and where it applies::

    - stage: gates
      rules:
        - max_accuracy_drop: 1.0          # pp vs 'against' (default baseline), same runtime
        - max_class_drop: 5               # pp lost on the worst class vs 'against'
          decide: lower                   # drops: estimate (default) | lower | upper end of the CI
          confidence: 0.95                # drops: of the paired interval (default 0.95)
        - max_flip_rate: 0.05             # share of images whose top-1 differs from 'against'
        - min_accuracy: 0.97              # absolute, fraction of the test set
        - min_above_chance_pp: 20         # pp of test accuracy above chance (100 / classes)
        - max_size_ratio: 0.5             # bytes / bytes of 'against'
          variants: [pruned.int8-dynamic]
        - max_latency_ratio: 1.2          # median latency / 'against', same runtime
          runtime: onnxruntime
          batch_size: 1
        - min_sparsity: 0.5
          variants: [pruned]
        - require_parity: true            # the export stage's parity check passed

``variants: all`` (the default) means every benchmarked variant except ``*.scratch``
controls and, for comparisons, the ``against`` variant itself; list names to gate others.
``runtime: all`` (the default) evaluates each runtime's row separately.

The stage reads the benchmark stage's results table, its declared output (``StageResult.table``:
``results.json`` and ``predictions.npz`` beside it; see ``compress.results``), as the engine hands
it over in ``ctx.results`` (``benchmark:`` names the stage; default: the last benchmark stage
before this one; without the predictions, from a benchmark of an older version, the rules that
need them are skipped, saying why). It evaluates every rule per (variant, runtime) row, pairing
the predictions of each row and its ``against`` row, and writes ``gates.json`` and JUnit XML
``gates.xml`` (published to ``reports/<pipeline>/``). It completes even when gates fail: the
failure is in its result's metrics (``failed`` > 0, ``results`` = one entry per gate and row, see
``compress.gating.Outcome``), which ``python -m compress.run`` turns into exit code 1, and the
report stage shows as warnings.
Because it reads another stage's result rather than variants, it is re-evaluated on every
run (``needs_results``): cheap, and never stale after a ``--force``'d benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr

from compress import gating
from compress.config import PipelineConfig, StageConfig, did_you_mean
from compress.context import Context
from compress.errors import ArtifactError
from compress.fileio import write_bytes, write_json
from compress.gating import GateRule
from compress.results import PREDICTIONS_FILE, Predictions, ResultsTable, TableError, predictions_beside
from compress.stages import stage
from compress.variants import StageResult, Variant


class GatesConfig(StageConfig):
    """Quality gates over the benchmark table, for CI: a failed gate makes the run exit 1."""

    stage: Literal["gates"] = Field(description="Checks quality gates over the benchmark table.")
    benchmark: str | None = Field(
        None, description="The benchmark stage whose table is gated; null: the last one before this stage."
    )
    rules: list[GateRule] = Field(min_length=1, description="The gates; each rule has exactly one gate key.")

    # the benchmark stage's 'baseline', set by check(), which the engine calls before consumes()
    _default_against: str = PrivateAttr("baseline")

    def resolved_rules(self, default_against: str | None = None) -> list[GateRule]:
        """The rules with 'against' filled in for comparisons that leave it out."""
        default = default_against or self._default_against
        return [
            rule.model_copy(update={"against": default})
            if rule.metric.relative and rule.against is None
            else rule
            for rule in self.rules
        ]

    def consumes(self, available: list[str]) -> list[str]:
        if self.from_ is not None:
            raise ValueError("from: the gates stage reads the benchmark table; choose variants per rule")
        known = ", ".join(available) or "none yet"
        for index, (given, rule) in enumerate(zip(self.rules, self.resolved_rules(), strict=True)):
            named = [("variants", n) for n in (rule.variants if isinstance(rule.variants, list) else [])]
            named += [("against", rule.against)] if rule.against is not None else []
            for key, name in named:
                if name not in available:
                    implicit = key == "against" and given.against is None
                    implicit_text = " (the benchmark's baseline)" if implicit else ""
                    raise ValueError(
                        f"rules[{index}].{key}: no earlier stage produces variant {name!r}{implicit_text}"
                        f"{did_you_mean(name, available)}; variants available here: {known}"
                    )
        rules = self.resolved_rules()
        if any(rule.variants == "all" for rule in rules):
            return list(available)
        wanted = {name for rule in rules for name in rule.named_variants()}
        return [name for name in available if name in wanted]

    def check(self, pipeline: PipelineConfig) -> None:
        earlier = _earlier_stages(pipeline, self)
        bench = _benchmark_stage(earlier, self.benchmark)
        runtimes = list(getattr(bench, "runtimes", gating.RUNTIME_NAMES))
        batch_sizes = list(getattr(bench, "batch_sizes", []))
        benchmarked = getattr(bench, "from_", None)
        self._default_against = getattr(bench, "baseline", "baseline")
        for index, rule in enumerate(self.resolved_rules()):
            if rule.runtime != "all" and rule.runtime not in runtimes:
                raise ValueError(
                    f"rules[{index}].runtime: the benchmark stage {bench.label!r} does not measure "
                    f"{rule.runtime!r}; it measures {', '.join(runtimes)}"
                )
            if rule.batch_size is not None and batch_sizes and rule.batch_size not in batch_sizes:
                raise ValueError(
                    f"rules[{index}].batch_size: the benchmark stage {bench.label!r} times batch sizes "
                    f"{', '.join(map(str, batch_sizes))}, not {rule.batch_size}"
                )
            if rule.metric.key == "require_parity":
                if not any(s.stage == "export" for s in earlier):
                    raise ValueError(
                        f"rules[{index}].require_parity: no export stage runs before the gates; "
                        "add '- stage: export' before the benchmark"
                    )
                if not set(runtimes) & set(gating.EXPORT_RUNTIMES):
                    raise ValueError(
                        f"rules[{index}].require_parity: the benchmark stage {bench.label!r} measures no "
                        "exported runtime (torchscript, onnxruntime)"
                    )
            if benchmarked is not None:
                for name in rule.named_variants():
                    if name not in benchmarked:
                        raise ValueError(
                            f"rules[{index}]: variant {name!r} is not benchmarked (the benchmark stage "
                            f"{bench.label!r} reads only {', '.join(benchmarked)})"
                        )


def _earlier_stages(pipeline: PipelineConfig, me: StageConfig) -> list[Any]:
    for index, entry in enumerate(pipeline.stages):
        if entry is me or getattr(entry, "label", None) == me.label:  # labels are unique
            return list(pipeline.stages[:index])
    return list(pipeline.stages)


def _benchmark_stage(earlier: list[Any], label: str | None) -> Any:
    benches = [s for s in earlier if getattr(s, "stage", None) == "benchmark"]
    if label is None:
        if not benches:
            raise ValueError(
                "stage: the gates stage checks the benchmark table; add '- stage: benchmark' before it"
            )
        return benches[-1]
    for entry in benches:
        if entry.label == label:
            return entry
    names = [s.label for s in benches]
    raise ValueError(
        f"benchmark: no benchmark stage named {label!r} before the gates{did_you_mean(label, names)}; "
        f"benchmark stages before it: {', '.join(names) or 'none'}"
    )


def read_table(ctx: Context, label: str) -> ResultsTable:
    """The benchmark stage's results table, as its result declared it (``ctx.results``)."""
    result = ctx.results.get(label)
    path = result.table if result is not None else None
    if path is None or not Path(path).is_file():
        where = f" at {path}" if path is not None else ""
        raise ArtifactError(f"stage gates: the benchmark stage {label!r} left no results table{where}")
    try:
        return ResultsTable.load(path)
    except TableError as exc:
        raise ArtifactError(f"stage gates: {exc}") from None


def read_predictions(ctx: Context, label: str) -> tuple[Predictions | None, str]:
    """The predictions kept beside the benchmark's table, or None and why (one line for a
    skipped gate)."""
    try:
        found = predictions_beside(ctx.results[label].table)
    except ValueError as exc:
        ctx.log.warning("gates: %s", exc)
        return None, str(exc)
    if found is None:
        return None, (
            f"the benchmark stage {label!r} saved no {PREDICTIONS_FILE} (it ran before paired "
            f"statistics existed); re-run it with --from {label}"
        )
    return found, ""


@stage("gates", GatesConfig, version=1, needs_data=False, needs_results=True)
def run(cfg: GatesConfig, inputs: list[Variant], ctx: Context, out_dir: Path) -> StageResult:
    bench = _benchmark_stage(_earlier_stages(ctx.pipeline.config, cfg), cfg.benchmark)
    label = bench.label
    rules = cfg.resolved_rules(getattr(bench, "baseline", None))
    rows = read_table(ctx, label).rows
    started = time.perf_counter()
    predictions, missing = read_predictions(ctx, label)
    outcomes = gating.evaluate(rules, rows, predictions, missing)
    ctx.log.info(
        "gates: %s and %d rules evaluated in %.3f s",
        f"{PREDICTIONS_FILE} read" if predictions is not None else f"no {PREDICTIONS_FILE}",
        len(rules),
        time.perf_counter() - started,
    )
    tally = gating.counts(outcomes)
    results = [o.to_json() for o in outcomes]
    rules = [
        {"id": gate, "rule": rule.describe(), **_dumped(rule)}
        for gate, rule in zip(gating.rule_ids(rules), rules, strict=True)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / "gates.json",
        {
            "pipeline": ctx.pipeline.name,
            "run_id": ctx.run_id,
            "benchmark": label,
            **tally,
            "rules": rules,
            "results": results,
        },
    )
    suite = f"{ctx.pipeline.name}.gates"
    properties = {"pipeline": ctx.pipeline.name, "run_id": ctx.run_id, "benchmark": label}
    write_bytes(out_dir / "gates.xml", gating.junit_xml(outcomes, suite, properties))
    ctx.log.info(
        "gates: %d passed, %d failed, %d skipped (%d rules over %d rows of %r)",
        tally["passed"],
        tally["failed"],
        tally["skipped"],
        len(cfg.rules),
        len(rows),
        label,
    )
    for o in outcomes:
        if o.status == gating.FAILED:
            ctx.log.warning("gate failed: %s: %s: %s", o.gate, o.case, o.message)
    return StageResult(
        metrics={
            **tally,
            "benchmark": label,
            "failures": [f"{o.gate}: {o.case}: {o.message}" for o in outcomes if o.status == gating.FAILED],
            "results": results,
        },
        publish={"gates.json": "gates.json", "gates.xml": "gates.xml"},
    )


def _dumped(rule: GateRule) -> dict[str, Any]:
    """The rule's keys for gates.json; decide and confidence only where they mean something (drops)."""
    dropped = set() if rule.metric.interval else {"decide", "confidence"}
    return rule.model_dump(mode="json", exclude_none=True, exclude=dropped)
