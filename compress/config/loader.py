"""Loading a pipeline: read the file, apply ``--set`` overrides, validate every stage.

The whole pipeline is checked before anything runs, including that every ``from:`` names a
variant an earlier stage produces, so a typo fails in a second, not twenty minutes in.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from compress.config.messages import did_you_mean, format_errors, join_problems
from compress.config.paths import apply_override
from compress.config.pipeline import Pipeline, PipelineConfig, StageConfig
from compress.config.safety import SAFE_NAME, SAFE_NAME_TEXT, mask_secrets
from compress.config.yaml_file import read_yaml
from compress.errors import ConfigError


def load_pipeline(
    path: str | Path,
    registry: Mapping[str, type[StageConfig]],
    overrides: Iterable[str] = (),
) -> Pipeline:
    """Read, override and validate a pipeline file; raise ConfigError with a usable message."""
    path = Path(path)
    raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override, where=f"--set {mask_secrets(override)}")
    return validate_pipeline(raw, path, registry)


def load_pipeline_dict(
    raw: Mapping[str, Any],
    registry: Mapping[str, type[StageConfig]],
    overrides: Iterable[str] = (),
    default_name: str = "pipeline",
) -> Pipeline:
    """``load_pipeline`` for a pipeline built in Python (a notebook) instead of read from a file.

    The same overrides, validation and messages; messages name it ``<dict>`` (``<dict NAME>``
    with a ``name:``). Its relative paths are relative to the working directory, as there is no
    file to be relative to. The caller's dict is left as it was.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"<dict>: the top level must be a mapping (key: value), not {type(raw).__name__}")
    raw = copy.deepcopy(dict(raw))
    for override in overrides:
        apply_override(raw, override, where=f"--set {mask_secrets(override)}")
    name = raw.get("name")
    # a display name only: no '/' in it, so that its parent (the base of data.root) is the cwd
    path = Path(f"<dict {name}>" if isinstance(name, str) and SAFE_NAME.fullmatch(name) else "<dict>")
    pipeline = validate_pipeline(raw, path, registry)
    return pipeline if pipeline.config.name else pipeline.model_copy(update={"name": default_name})


def validate_pipeline(raw: dict[str, Any], path: Path, registry: Mapping[str, type[StageConfig]]) -> Pipeline:
    try:
        top = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(path, exc, PipelineConfig, prefix="")) from None

    stages: list[StageConfig] = []
    problems: list[str] = []
    for index, entry in enumerate(top.stages):
        where = f"stages[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with a 'stage:' key")
            continue
        kind = entry.get("stage")
        if kind is None:
            problems.append(f"{where}: missing 'stage:' (one of {', '.join(sorted(registry))})")
            continue
        if not isinstance(kind, str) or kind not in registry:
            problems.append(
                f"{where}.stage: unknown stage {kind!r}{did_you_mean(str(kind), registry)}; "
                f"known stages: {', '.join(sorted(registry))}"
            )
            continue
        label = f"{where} ({entry.get('name') or kind})"
        try:
            stages.append(registry[kind].model_validate(entry))
        except ValidationError as exc:
            problems.append(format_errors(None, exc, registry[kind], prefix=label))
    if problems:
        raise ConfigError(join_problems(path, problems))

    top.stages = stages
    name = top.name or path.stem
    _check_graph(path, top)
    return Pipeline(path=path, name=name, config=top, raw=raw)


def _check_graph(path: Path, config: PipelineConfig) -> None:
    """Names are unique and every ``from:`` names a variant an earlier stage produces."""
    problems: list[str] = []
    seen_labels: set[str] = set()
    available: list[str] = []
    for index, stage in enumerate(config.stages):
        where = f"stages[{index}] ({stage.label})"
        if stage.label in seen_labels:
            problems.append(
                f"{where}.name: duplicate stage name {stage.label!r}; give each stage a distinct 'name:'"
            )
        seen_labels.add(stage.label)
        for wanted in stage.from_ or []:
            if wanted not in available:
                known = ", ".join(available) or "none yet"
                problems.append(
                    f"{where}.from: no earlier stage produces variant {wanted!r}"
                    f"{did_you_mean(wanted, available)}; variants available here: {known}"
                )
        try:
            stage.check(config)
        except ValueError as exc:  # its outputs still count: later stages get no second, false error
            problems.append(f"{where}.{exc}")
        try:
            inputs = stage.consumes(list(available))
        except ValueError as exc:
            problems.append(f"{where}.{exc}")
            continue
        for produced in stage.produces(inputs):
            if not SAFE_NAME.fullmatch(produced):
                problems.append(f"{where}.output: variant name {SAFE_NAME_TEXT}, got {produced!r}")
            if produced in available:
                problems.append(
                    f"{where}: variant {produced!r} is already produced by an earlier stage; "
                    "choose another output name"
                )
            available.append(produced)
    if problems:
        raise ConfigError(join_problems(path, problems))
