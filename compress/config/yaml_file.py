"""Reading a pipeline file: YAML with the safe loader, with limits on size and shape.

A pipeline may come from someone else, so the file is refused before parsing when it is too
big, nested absurdly deep, expands to too many values through anchors ("billion laughs"), or
gives a key twice (YAML would silently keep the last one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compress.errors import ConfigError

MAX_YAML_BYTES = 1_000_000
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 50
SHALLOW = "a pipeline file is only a few levels deep"


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: file not found; give the path to a pipeline YAML file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give the path to a pipeline YAML file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES} bytes; is this a pipeline file?")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    try:
        _refuse_alias_bombs(path, text)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context, start = exc.context, exc.context_mark
        since = (
            f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
            if context and start and mark and start.line != mark.line
            else ""
        )
        raise ConfigError(f"{where}: YAML syntax error: {exc.problem}{since}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a pipeline needs at least 'stages:'")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (key: value), not {type(data).__name__}")
    return data


def _refuse_alias_bombs(path: Path, text: str) -> None:
    """Count nodes with aliases expanded, so a 'billion laughs' file fails fast and small; also
    refuse absurd nesting and a key given twice in one mapping (YAML would keep the last one)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read; {SHALLOW}") from None
    if root is None:
        return
    memo: dict[int, int] = {}

    def at(node: yaml.Node) -> str:
        return f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{at(node)}: nested more than {MAX_YAML_DEPTH} levels deep; {SHALLOW}")
        memo[key] = 1  # guards against recursive aliases
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            first_seen: dict[str, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in first_seen:
                        raise ConfigError(
                            f"{at(k)}: duplicate key {k.value!r} (first on line {first_seen[k.value]}); "
                            "YAML would silently keep only the last one: remove one of them"
                        )
                    first_seen[k.value] = k.start_mark.line + 1
                total += size(k, depth + 1) + size(v, depth + 1)
        memo[key] = total
        return total

    if size(root, 0) > MAX_YAML_NODES:
        raise ConfigError(
            f"{path}: expands to more than {MAX_YAML_NODES} values (anchors/aliases?); "
            "a pipeline file should be small"
        )
