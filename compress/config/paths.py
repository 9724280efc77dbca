"""YAML paths (``stages[1].optimizer.lr``, ``train.epochs``): parsing, locating, overriding.

``--set KEY=VALUE`` and the tune stage's search space both name values this way, so one
parser serves both; a stage may be addressed by its name or, when unique, by its kind.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from compress.config.messages import did_you_mean
from compress.config.pipeline import PipelineConfig
from compress.errors import ConfigError

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def split_path(path: str) -> list[str | int]:
    """'stages[1].optimizer.lr' -> ['stages', 1, 'optimizer', 'lr']."""
    parts: list[str | int] = []
    pos = 0
    for match in _SEGMENT.finditer(path):
        gap = path[pos : match.start()].strip(".")
        if gap:
            raise ValueError(f"cannot parse {path!r} near {gap!r}")
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        pos = match.end()
    if not parts or path[pos:].strip("."):
        raise ValueError(f"cannot parse {path!r}")
    return parts


def _stage_index(stages: list[Any], key: str) -> int | None:
    """A stage is addressed by its name, or by its type when only one stage has it."""
    named = [i for i, s in enumerate(stages) if isinstance(s, dict) and s.get("name") == key]
    if named:
        return named[0]
    typed = [
        i for i, s in enumerate(stages) if isinstance(s, dict) and s.get("stage") == key and not s.get("name")
    ]
    return typed[0] if len(typed) == 1 else None


def locate(raw: dict[str, Any], path: str, create: bool = False) -> tuple[Any, str | int]:
    """Find the container and key that ``path`` names in raw YAML data.

    Accepts ``stages[0].epochs``, ``stages.train.epochs`` and the short ``train.epochs``
    (a stage by its name). Used by ``--set`` and by the tune stage's search space. With
    ``create`` (``--set``), mappings the YAML leaves out are made on the way
    (``--set quantize.latency.rounds=5``, ``--set name=x``); the schema then checks every key.
    """
    parts = split_path(path)
    stages = raw.get("stages")
    top_level = create and parts[0] in PipelineConfig.model_fields
    if isinstance(parts[0], str) and parts[0] not in raw and isinstance(stages, list) and not top_level:
        if _stage_index(stages, parts[0]) is not None:
            parts = ["stages", *parts]
        else:
            names = [s.get("name") or s.get("stage") for s in stages if isinstance(s, dict)]
            choices = [*raw, *(n for n in names if isinstance(n, str))]
            raise KeyError(
                f"{parts[0]!r} is neither a top-level key nor a stage name"
                f"{did_you_mean(parts[0], choices)}; choose from: {', '.join(choices)}"
            )
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list) and isinstance(part, str):
            index = _stage_index(node, part)
            if index is None:
                raise KeyError(f"no stage named {part!r}")
            part = index
        if create and isinstance(node, dict) and isinstance(part, str) and part not in node:
            node[part] = {}
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            shown = ".".join(str(p) for p in parts[: depth + 1])
            count = len(node) if isinstance(node, list) else 0
            plural = "" if count == 1 else "s"
            size = f" ({shown.rsplit('.', 1)[0]} has {count} item{plural})" if count else ""
            raise KeyError(f"{shown!r} does not exist{size}") from None
    last = parts[-1]
    if isinstance(node, list) and isinstance(last, str):
        index = _stage_index(node, last)
        if index is None:
            raise KeyError(f"no stage named {last!r}")
        last = index
    if not isinstance(node, dict | list):
        raise KeyError(f"{path!r} goes inside a value that is not a mapping")
    return node, last


def parse_override_value(text: str) -> Any:
    """Scalars stay strings so pydantic types them by the schema; lists and maps are YAML."""
    stripped = text.strip()
    if stripped.lower() in ("null", "none", "~"):
        return None
    if stripped.startswith(("[", "{")):
        return yaml.safe_load(stripped)
    return stripped


def apply_override(raw: dict[str, Any], override: str, where: str) -> None:
    if "=" not in override:
        raise ConfigError(f"{where}: expected KEY=VALUE, e.g. --set data.limit_train=2000")
    key, value = override.split("=", 1)
    try:
        node, last = locate(raw, key.strip(), create=True)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None
    if isinstance(node, list) and isinstance(last, int) and last >= len(node):
        raise ConfigError(f"{where}: index {last} is past the end ({len(node)} items)")
    try:
        parsed = parse_override_value(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: value is not valid YAML ({exc})") from None
    node[last] = parsed
