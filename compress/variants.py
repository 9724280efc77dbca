"""Variants: a named model file plus what is known about it, passed from stage to stage.

Every view a user sees (the results table, the charts, the gates) is computed over the list
of variants, so a variant carries its lineage and the metrics its producing stage measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from compress.models import ModelSpec, load_model

Format = Literal["torch", "onnx", "pt2"]  # pt2: torch.export.save program (int8 PyTorch variants)


@dataclass
class Variant:
    """``format`` says how to run it: 'torch' files load with ``models.load_model``,
    'onnx' files (e.g. onnxruntime-quantized models) only run in onnxruntime."""

    name: str
    format: Format
    file: Path
    stage: str = ""
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def load_torch(self) -> tuple[nn.Module, ModelSpec]:
        if self.format != "torch":
            raise ValueError(f"variant {self.name!r} is {self.format}-only; it has no torch model")
        return load_model(self.file)

    def to_json(self, base: Path) -> dict[str, Any]:
        data = asdict(self)
        data["file"] = Path(self.file).relative_to(base).as_posix()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], base: Path) -> Variant:
        return cls(**{**data, "file": Path(base) / data["file"]})


@dataclass
class StageResult:
    """What a stage hands back: new variants, stage-level metrics, and files to publish.

    ``publish`` maps a file inside the stage's output directory to a name under
    ``reports/<pipeline>/``; the engine copies it there, so stages never write outside
    their own directory. ``artifacts`` attaches further files to existing variants
    (variant name -> kind -> path, e.g. the export stage's ``{"baseline": {"onnx": ...}}``);
    later stages find them in ``ctx.artifacts`` and they count in those stages' cache keys.
    ``table`` is the results table the stage made (its ``results.json``, with ``predictions.npz``
    beside it when kept; see ``compress.results``): a declared output, so later stages read it
    from ``ctx.results[label].table`` rather than from the stage's directory, and a cached stage
    hands it on like its variants.
    """

    variants: list[Variant] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    publish: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Path]] = field(default_factory=dict)
    # settings for later stages, {stage label: {YAML path inside it: value}} (the tune stage's
    # choice); the engine applies them to that stage's config, re-validated, before its cache key
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    table: Path | None = None
    made: dict[str, Any] = field(default_factory=dict)  # set by the cache: the run that made it
