"""Settings addressed by YAML path inside one stage (``finetune.optimizer.lr``): a trial's
sampled values and the chosen ones reach a stage's config this way, validated by the stage's
own class, so a tuned config is exactly what the user could have written.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from compress.config import StageConfig, format_errors, split_path


def stage_path(path: str, label: str) -> list[str | int]:
    """A setting's path inside a stage; a leading ``<label>.`` (as in ``prune.amount``) is dropped."""
    parts = split_path(path)
    if len(parts) > 1 and parts[0] == label:
        parts = parts[1:]
    return parts


def with_settings(
    cfg: StageConfig, settings: dict[str, Any], pipeline: Any | None = None, where: str = ""
) -> StageConfig:
    """``cfg`` with the values at the given YAML paths replaced, validated again by its own class.

    Starts from what the user wrote (so the stage's "was this key given?" checks still work);
    a section the user left out is first filled with its default value, so changing one
    field of it keeps the others at the stage's defaults rather than the section's class
    defaults. Raises ValueError with the path when a value is not valid for the stage.
    """
    given = cfg.model_dump(mode="python", by_alias=True, exclude_unset=True)
    full = cfg.model_dump(mode="python", by_alias=True)
    for path, value in settings.items():
        try:
            parts = stage_path(path, cfg.label)
        except ValueError as exc:
            raise ValueError(f"{where}{path}: {exc}") from None
        node, default = given, full
        for part in parts[:-1]:
            sub_default = _child(default, part)
            if isinstance(node, dict):
                if not isinstance(node.get(part), dict | list):
                    node[part] = copy.deepcopy(sub_default) if isinstance(sub_default, dict | list) else {}
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                raise ValueError(f"{where}{path}: {part!r} is not a section of stage {cfg.label!r}")
            default = sub_default
        last = parts[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise ValueError(f"{where}{path}: no item {last!r} in that list")
        elif not isinstance(node, dict):
            raise ValueError(f"{where}{path}: goes inside a value that is not a mapping")
        node[last] = value
    try:
        new = type(cfg).model_validate(given)
    except ValidationError as exc:
        text = format_errors(None, exc, type(cfg), prefix="")
        raise ValueError(f"{where}{_paths_text(settings)} -> {text}") from None
    if pipeline is not None:
        try:
            new.check(pipeline)
        except ValueError as exc:
            raise ValueError(f"{where}{_paths_text(settings)} -> {exc}") from None
    return new


def _child(node: Any, part: str | int) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None


def _paths_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in settings.items())


def value_at(cfg: StageConfig, path: str) -> Any:
    """The current (validated, defaults filled) value of a setting, or None if absent."""
    node: Any = cfg.model_dump(mode="python", by_alias=True)
    for part in stage_path(path, cfg.label):
        node = _child(node, part)
        if node is None:
            return None
    return node


def step_config(
    cls: type[StageConfig], settings: dict[str, Any], inputs: list[str], pipeline: Any | None = None
) -> StageConfig:
    """A stage config of class ``cls`` built from ``settings`` (nested YAML, as a user writes a
    stage) reading ``inputs``: one step of a search trial's chain. Raises ValueError in the
    YAML's words when the stage refuses a value."""
    kind = cls.model_fields["stage"].annotation.__args__[0]  # Literal["prune"] -> "prune"
    try:
        cfg = cls.model_validate({**settings, "stage": kind, "from": list(inputs)})
    except ValidationError as exc:
        raise ValueError(format_errors(None, exc, cls, prefix="")) from None
    if pipeline is not None:
        cfg.check(pipeline)
    return cfg
