"""What a gate rule is: the metrics it can check and the ``rules:`` schema of the gates stage.

Each rule names exactly one metric (``max_accuracy_drop: 1.0``) plus where it applies:
``variants`` (default ``all``: every shipped variant, see :func:`shipped`), ``runtime`` and, for
relative metrics, the ``against`` variant of the same runtime. Drop rules (``max_accuracy_drop``,
``max_class_drop``) also say what meets the threshold: the measured drop (``decide: estimate``)
or an end of its paired confidence interval (``lower``, ``upper``; see ``compress.measure.paired``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from compress.config import StrictModel
from compress.gating.numbers import confidence_text, pct, pp, times

SCRATCH_SUFFIX = ".scratch"  # from-scratch controls (distill stage): not shipped, not gated by 'all'
EXPORT_RUNTIMES = ("torchscript", "onnxruntime")
RUNTIME_NAMES = ("pytorch", "torchscript", "onnxruntime")
ESTIMATE = "estimate"  # a drop rule's default decision: the measured drop meets the threshold


def shipped(name: str) -> bool:
    """False for a from-scratch control: it measures what distillation bought and is no deliverable."""
    return not name.endswith(SCRATCH_SUFFIX)


@dataclass(frozen=True)
class MetricDef:
    key: str
    op: str  # '<=' for max_*, '>=' for min_*
    relative: bool  # compared with the 'against' variant (same runtime)
    what: str  # the measured quantity, as printed
    fmt: Callable[[float, int], str]
    help: str
    interval: bool = False  # a drop with a paired confidence interval: takes decide and confidence
    paired: bool = False  # needs the benchmark's per-image predictions (predictions.npz)


METRICS: dict[str, MetricDef] = {
    m.key: m
    for m in (
        MetricDef(
            "max_accuracy_drop",
            "<=",
            True,
            "accuracy drop",
            pp,
            "percentage points of test accuracy lost against 'against' (same runtime)",
            interval=True,
        ),
        MetricDef(
            "max_class_drop",
            "<=",
            True,
            "class drop",
            pp,
            "percentage points of accuracy lost on the worst class against 'against' (same runtime)",
            interval=True,
            paired=True,
        ),
        MetricDef(
            "max_flip_rate",
            "<=",
            True,
            "flip rate",
            pct,
            "fraction of test images whose top-1 differs from the top-1 of 'against', e.g. 0.05",
            paired=True,
        ),
        MetricDef("min_accuracy", ">=", False, "accuracy", pct, "test accuracy as a fraction, e.g. 0.97"),
        MetricDef(
            "min_above_chance_pp",
            ">=",
            False,
            "accuracy above chance",
            pp,
            "percentage points of test accuracy above chance (100 / number of classes), e.g. 20",
        ),
        MetricDef(
            "max_size_ratio",
            "<=",
            True,
            "size ratio",
            times,
            "file bytes / bytes of 'against' (0.25 = 4x smaller)",
        ),
        MetricDef(
            "max_gzip_ratio", "<=", True, "gzip size ratio", times, "gzip bytes / gzip bytes of 'against'"
        ),
        MetricDef(
            "max_latency_ratio",
            "<=",
            True,
            "latency ratio",
            times,
            "median latency / latency of 'against', same runtime and batch size",
        ),
        MetricDef("min_sparsity", ">=", False, "sparsity", pct, "fraction of zero parameters, e.g. 0.5"),
        MetricDef(
            "require_parity", "==", False, "export parity", pct, "the export stage's parity check passed"
        ),
    )
}


# ---------------------------------------------------------------- the rule schema (YAML)


class GateRule(StrictModel):
    """One gate: exactly one metric key (``max_accuracy_drop: 1.0``) plus where it applies."""

    name: str | None = Field(
        None, min_length=1, max_length=100, description="The gate's name in the results; null: its metric."
    )
    variants: Literal["all"] | list[str] = Field(
        "all",
        description="Variants gated: all (every benchmarked variant except *.scratch controls), one name, "
        "or a list.",
        json_schema_extra={  # _one_name, _names
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "uniqueItems": True},
            ]
        },
    )
    against: str | None = Field(
        None,
        description="Relative gates: the reference variant (same runtime); null: the benchmark's baseline.",
    )
    runtime: Literal["all", "pytorch", "torchscript", "onnxruntime"] = Field(
        "all", description="The runtime whose rows are gated; all: each runtime's rows separately."
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="max_latency_ratio: the batch size compared; null: 1 if timed, else the first timed.",
    )
    decide: Literal["estimate", "lower", "upper"] = Field(
        ESTIMATE,
        description="Drop gates: what meets the threshold: estimate (the measured drop), lower (the "
        "interval's lower end: fails only a drop significantly beyond it) or upper (its upper end: "
        "passes only a drop significantly within it).",
    )
    confidence: float = Field(
        0.95,
        description="Drop gates: confidence level of the drop's paired interval, strictly between 0 and 1.",
        json_schema_extra={"exclusiveMinimum": 0, "exclusiveMaximum": 1},  # _confidence
    )
    max_accuracy_drop: float | None = Field(
        None, ge=-100, le=100, description="Gate: percentage points of test accuracy lost against 'against'."
    )
    max_class_drop: float | None = Field(
        None,
        ge=-100,
        le=100,
        description="Gate: percentage points of accuracy lost on the worst class against 'against'.",
    )
    max_flip_rate: float | None = Field(
        None,
        description="Gate: fraction of test images whose top-1 differs from that of 'against', e.g. 0.05.",
        json_schema_extra={"minimum": 0, "maximum": 1},  # _flip_fraction
    )
    min_accuracy: float | None = Field(
        None,
        description="Gate: test accuracy as a fraction, e.g. 0.97.",
        json_schema_extra={"minimum": 0, "maximum": 1},  # _fraction
    )
    min_above_chance_pp: float | None = Field(
        None,
        ge=-100,
        le=100,
        description="Gate: percentage points of test accuracy above chance (100 / number of classes).",
    )
    max_size_ratio: float | None = Field(
        None, gt=0, description="Gate: file bytes / bytes of 'against' (0.25 = 4x smaller)."
    )
    max_gzip_ratio: float | None = Field(
        None, gt=0, description="Gate: gzip bytes / gzip bytes of 'against'."
    )
    max_latency_ratio: float | None = Field(
        None, gt=0, description="Gate: median latency / latency of 'against', same runtime and batch size."
    )
    min_sparsity: float | None = Field(
        None, ge=0, le=1, description="Gate: fraction of zero parameters (list the pruned variants)."
    )
    require_parity: bool | None = Field(
        None,
        description="Gate: true: the export stage's parity check passed.",
        json_schema_extra={"anyOf": [{"const": True}, {"type": "null"}]},  # false is refused (_one_metric)
    )

    @field_validator("min_accuracy")
    @classmethod
    def _fraction(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 1:
            raise ValueError(
                f"is a fraction of the test set between 0 and 1 (e.g. 0.97 for 97%), not {value}"
            )
        return value

    @field_validator("max_flip_rate")
    @classmethod
    def _flip_fraction(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 1:
            raise ValueError(
                f"is a fraction of the test images between 0 and 1 (e.g. 0.05 for 5%), not {value}"
            )
        return value

    @field_validator("confidence")
    @classmethod
    def _confidence(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"is a confidence level strictly between 0 and 1 (e.g. 0.95), not {value}")
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) and value != "all" else value

    @field_validator("variants")
    @classmethod
    def _names(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("list each variant once, at least one; or write 'all'")
        return value

    @model_validator(mode="after")
    def _one_metric(self) -> GateRule:
        given = [key for key in METRICS if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(
                f"each rule has exactly one gate ({', '.join(METRICS)}); "
                + (f"this one has {len(given)}: {', '.join(given)}" if given else "this one has none")
            )
        metric = METRICS[given[0]]
        if self.require_parity is False:
            raise ValueError("require_parity: false gates nothing; remove the rule instead")
        if self.against is not None and not metric.relative:
            relative = ", ".join(k for k, m in METRICS.items() if m.relative)
            raise ValueError(f"against: only {relative} compare with another variant")
        given_interval = [key for key in ("decide", "confidence") if key in self.model_fields_set]
        if given_interval and not metric.interval:
            drops = ", ".join(k for k, m in METRICS.items() if m.interval)
            raise ValueError(
                f"{given_interval[0]}: only drop rules ({drops}) have an interval to decide by; "
                f"remove {' and '.join(given_interval)} from this {metric.key} rule"
            )
        if self.batch_size is not None and metric.key != "max_latency_ratio":
            raise ValueError("batch_size: only max_latency_ratio is measured per batch size")
        if metric.key == "min_sparsity" and self.variants == "all":
            raise ValueError(
                "variants: min_sparsity needs the pruned variants listed "
                "(baseline and quantized models are dense)"
            )
        if metric.key == "require_parity" and self.runtime == "pytorch":
            raise ValueError(
                "runtime: parity is checked for exported files (torchscript, onnxruntime), not pytorch"
            )
        return self

    @property
    def metric(self) -> MetricDef:
        return next(METRICS[key] for key in METRICS if getattr(self, key) is not None)

    @property
    def threshold(self) -> float:
        value = getattr(self, self.metric.key)
        return 1.0 if value is True else float(value)

    @property
    def reference(self) -> str:
        return self.against or "baseline"

    def named_variants(self) -> list[str]:
        names = [] if self.variants == "all" else list(self.variants)
        return names + ([self.reference] if self.metric.relative else [])

    def describe(self) -> str:
        metric = self.metric
        if metric.key == "require_parity":
            text = "export parity must pass"
        else:
            text = f"{metric.key} {self.threshold:g}"
        if metric.relative:
            text += f" vs {self.reference}"
        if metric.key == "max_latency_ratio" and self.batch_size:
            text += f" (batch {self.batch_size})"
        if metric.interval and self.decide != ESTIMATE:
            text += f" ({self.decide} end of the {confidence_text(self.confidence)} CI decides)"
        return text


def rule_ids(rules: list[GateRule]) -> list[str]:
    """A stable id per rule: its name, else its metric (numbered when a metric repeats)."""
    base = [r.name or r.metric.key for r in rules]
    return [b if base.count(b) == 1 else f"{b}#{i}" for i, b in enumerate(base)]
