"""Error messages that read like the YAML path the user has to edit.

``pipelines/x.yaml: stages[2] (prune).amount: ...`` is what a user searches for in their
editor, so pydantic's errors are rewritten into that form, with a did-you-mean for typos.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from compress.config.safety import mask_secrets


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def join_problems(path: Path, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{path}: {problems[0]}"
    return f"{path}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)


def format_errors(path: Path | None, exc: ValidationError, model: type[BaseModel], prefix: str) -> str:
    lines = []
    for error in exc.errors():
        loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = prefix
        for part in loc:
            key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        msg = error["msg"].removeprefix("Value error, ")  # our validators' own words
        if error["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            allowed = _fields_at(model, loc[:-1])
            msg = f"unknown key{did_you_mean(loc[-1], allowed)}; allowed keys: {', '.join(allowed)}"
        elif error["type"] == "missing":
            msg = "required key is missing"
        elif error["type"] in ("model_type", "dict_type") and not isinstance(error.get("input"), dict):
            msg = f"should be a mapping of keys and values, not {type(error.get('input')).__name__}"
            if not isinstance(error.get("input"), list):
                msg += f" (got {error.get('input')!r})"
        elif "input" in error and not isinstance(error["input"], dict | list):
            if mask_secrets(repr(error["input"])) not in mask_secrets(msg):
                msg = f"{msg} (got {error['input']!r})"
            bound = (error.get("ctx") or {}).get("le", (error.get("ctx") or {}).get("lt"))
            if error["type"] in ("less_than_equal", "less_than") and isinstance(bound, int | float):
                if bound >= 100:
                    msg += "; the upper bound catches typos such as an extra zero, larger values are refused"
                elif bound == 1:
                    msg += "; it is a fraction (0.9 means 90%)"
        lines.append(f"{key or '(top level)'}: {msg}")
    lines = [mask_secrets(line) for line in lines]  # e.g. a storage URL with its password
    if path is None:
        return "\n  ".join(lines)
    return join_problems(path, lines)


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The keys allowed at a nested YAML location, for did-you-mean suggestions."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = next(
            (f for n, f in current.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
