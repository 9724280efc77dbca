"""``python -m compress.reference [--check] [--root DIR]``: the pipeline reference, generated.

Writes ``docs/reference/pipeline.md`` (one table per section and stage: every key as users write
it, its type, default, allowed values and description) and ``docs/schema/pipeline.schema.json``
(the schema editors read through the modeline at the top of ``pipelines/*.yaml``). Both come from
the pydantic models alone, so a description is written once, on its field, and the docs cannot
drift from what the loader accepts. ``--check`` (for CI) writes nothing and exits 1 naming the
first committed file that differs from what would be generated.

This module lives outside ``compress.config`` because it needs the stage registry, and
``compress.config`` never imports ``compress.stages``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from compress.config.schema import pipeline_schema
from compress.fileio import write_text

REFERENCE = Path("docs/reference/pipeline.md")
SCHEMA = Path("docs/schema/pipeline.schema.json")
COMMAND = "python -m compress.reference"
COLUMNS = ("key", "type", "default", "allowed", "description")
FIRST = ("stage", "name", "from")  # the keys every stage has, first in its table
INTRO = f"""\
# Pipeline reference

Generated from the pipeline models by `{COMMAND}`; do not edit it by hand (change a field's
`description=` in the code and run the command again). The same information is in the JSON Schema
`docs/schema/pipeline.schema.json`, which editors with the YAML language server read through the
first line of every file in `pipelines/`.

Unknown keys are errors everywhere. Nested keys are written with dots (`optimizer.lr` is `lr:`
inside `optimizer:`); `rules[].name` is a key of each item of the list `rules`, and
`space.<key>.low` a key of each value of the mapping `space`. Some rules involve several keys
(e.g. `warmup_epochs` below `epochs`) and are checked when the pipeline is loaded (also with
`--validate`), not by the schema.
"""


def schema_text(schema: Mapping[str, Any]) -> str:
    """The schema as committed: pretty-printed with sorted keys, so a change is a readable diff."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def reference_markdown(schema: Mapping[str, Any]) -> str:
    """The Markdown reference of ``schema``: the top level, ``data``, then one section per stage."""
    defs = schema.get("$defs", {})
    parts = [INTRO]
    top = schema["properties"]
    parts.append(_section("Top level", schema.get("description", ""), _rows(top, schema, defs, expand=False)))
    data = _model(top["data"], defs)
    if data is not None:
        parts.append(
            _section("`data`", data.get("description", ""), _rows_of(data, top["data"].get("default"), defs))
        )
    for branch in top["stages"]["items"].get("oneOf", [top["stages"]["items"]]):
        model = dict(_model(branch, defs) or {})
        kind = model["properties"]["stage"]["const"]
        order = sorted(model["properties"], key=lambda k: FIRST.index(k) if k in FIRST else len(FIRST))
        model["properties"] = {k: model["properties"][k] for k in order}  # sorted() is stable
        parts.append(_section(f"Stage `{kind}`", model.get("description", ""), _rows_of(model, None, defs)))
    return "\n".join(parts)


def generated_files(schema: Mapping[str, Any]) -> dict[Path, str]:
    """Each generated file's path (relative to the project root) and its text."""
    return {REFERENCE: reference_markdown(schema), SCHEMA: schema_text(schema)}


def stale_files(root: Path, files: Mapping[Path, str]) -> list[Path]:
    """The files under ``root`` that are missing or differ from their generated text."""
    stale = []
    for relative, text in files.items():
        path = root / relative
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(relative)
    return stale


def main(argv: list[str] | None = None) -> int:
    """Write the generated files, or with ``--check`` report the first stale one (exit 1)."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    parser.add_argument("--root", type=Path, default=Path("."), help="the project root (default: .)")
    args = parser.parse_args(argv)
    from compress.stages import config_registry  # every stage module: only when generating

    files = generated_files(pipeline_schema(config_registry()))
    if args.check:
        stale = stale_files(args.root, files)
        if stale:
            print(f"{stale[0]} is stale: run {COMMAND} and commit the result", file=sys.stderr)
            return 1
        return 0
    for relative, text in files.items():
        write_text(args.root / relative, text)
        print(f"wrote {relative}")
    return 0


# ---------------------------------------------------------------- tables


def _section(title: str, description: str, rows: Iterator[tuple[str, ...]]) -> str:
    lines = [f"## {title}", ""]
    if description:
        lines += [" ".join(description.split("\n\n")[0].split()).replace("<", "&lt;"), ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for *cells, description in rows:  # a description is prose: '<output>' must not become an HTML tag
        lines.append("| " + " | ".join(_cell(c) for c in (*cells, description.replace("<", "&lt;"))) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows_of(model: Mapping[str, Any], default: Any, defs: Mapping[str, Any]) -> Iterator[tuple[str, ...]]:
    """The rows of a model's keys, relative to the model (its section)."""
    yield from _rows(model.get("properties", {}), model, defs, default=default)


def _rows(
    properties: Mapping[str, Any],
    owner: Mapping[str, Any],
    defs: Mapping[str, Any],
    prefix: str = "",
    default: Any = None,
    expand: bool = True,
) -> Iterator[tuple[str, ...]]:
    """One row per key, then (``expand``) the keys of a section it holds, with dotted names.

    A default given by the enclosing key wins over the nested model's own (prune's ``finetune``
    trains 8 epochs, not TrainingConfig's 10)."""
    required = set(owner.get("required", []))
    for name, prop in properties.items():
        key = prefix + name
        if isinstance(default, dict) and name in default:
            value = default[name]
        else:
            value = prop.get("default", _REQUIRED if name in required else _NONE)
        model = _model(prop, defs)
        expanded = expand and model is not None and "properties" in model
        shown = "per key" if model is not None and isinstance(value, dict) else _value(value)
        allowed = _allowed(prop)
        if "not" in prop:  # a key that is refused here (its description says where it goes)
            shown = allowed = "-"
        yield (f"`{key}`", _type(prop, defs), shown, allowed, prop.get("description", ""))
        if not expanded:
            continue
        joint = _join(prop)
        inner = value if isinstance(value, dict) and joint == "." else None  # a section's own defaults
        yield from _rows(model["properties"], model, defs, f"{key}{joint}", inner)


_REQUIRED = object()
_NONE = object()


def _join(prop: Mapping[str, Any]) -> str:
    """How a nested key continues its parent's: ``.`` into a section, ``[].`` into a list's items,
    ``.<key>.`` into a mapping's values."""
    for node in _members(prop):
        if node.get("type") == "array":
            return "[]."
        if isinstance(node.get("additionalProperties"), dict):
            return ".<key>."
    return "."


def _members(prop: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [m for m in prop.get("anyOf", prop.get("oneOf", [prop]))]


def _model(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The model (a ``$defs`` entry with properties) a key holds, directly, in a list or a mapping."""
    for node in _members(prop):
        for inner in (node, node.get("items"), node.get("additionalProperties")):
            if isinstance(inner, dict) and "$ref" in inner:
                return defs[inner["$ref"].rsplit("/", 1)[-1]]
    return None


def _type(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    if "not" in prop:
        return "refused"
    names: list[str] = []
    for node in _members(prop):
        name = _type_name(node, defs)
        if name not in names:
            names.append(name)
    if "integer" in names and "number" in names:  # a number may be whole
        names.remove("integer")
    return " or ".join(names)


def _type_name(node: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    if "$ref" in node:
        return "mapping"
    kind = node.get("type")
    if kind is None and "const" in node:
        kind = {bool: "boolean", int: "integer", float: "number"}.get(type(node["const"]), "string")
    if kind == "array":
        items = node.get("items", {})
        inner = _type(items, defs) if items else ""
        return f"list of ({inner})" if " or " in inner else f"list of {inner}" if inner else "list"
    if kind == "object":
        values = node.get("additionalProperties")
        return f"mapping to {_type(values, defs)}" if isinstance(values, dict) and values else "mapping"
    return kind or "any"


def _allowed(prop: Mapping[str, Any]) -> str:
    """Choices and ranges, from the key itself and from each of its alternatives."""
    parts = _limits(prop)
    for node in _members(prop) if "anyOf" in prop or "oneOf" in prop else []:
        if node.get("type") != "null":
            parts += [p for p in _limits(node) if p not in parts]
    return "; ".join(parts)


def _limits(node: Mapping[str, Any]) -> list[str]:
    parts = []
    if "enum" in node:
        parts.append(", ".join(_value(v) for v in node["enum"]))
    if "const" in node:
        parts.append(_value(node["const"]))
    bounds = [f"{op} {_number(node[key])}" for key, op in _BOUNDS if key in node]
    if bounds:
        parts.append(", ".join(bounds))
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    if "maxLength" in node:
        parts.append(f"{node.get('minLength', 0)} to {node['maxLength']} characters")
    if node.get("minItems"):
        parts.append(f"at least {node['minItems']} item{'s' if node['minItems'] > 1 else ''}")
    if "maxItems" in node:
        parts.append(f"at most {node['maxItems']} items")
    if node.get("uniqueItems"):
        parts.append("each once")
    if "propertyNames" in node:
        parts.append(f"keys: {', '.join(_limits(node['propertyNames']))}")
    fewest, most = node.get("minProperties"), node.get("maxProperties")
    if fewest is not None and fewest == most:
        parts.append(f"exactly {fewest} key{'s' if fewest > 1 else ''}")
    else:
        for count, word in ((fewest, "at least"), (most, "at most")):
            if count is not None:
                parts.append(f"{word} {count} key{'s' if count > 1 else ''}")
    if "contains" in node:
        parts.append(f"must include {', '.join(_limits(node['contains']))}")
    for label, inner in (("each", node.get("items")), ("values", node.get("additionalProperties"))):
        if isinstance(inner, dict) and (inner_parts := _limits(inner)):
            parts.append(f"{label}: {', '.join(inner_parts)}")
    return parts


_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def _number(value: float) -> str:
    """Large bounds with thousands separators (10,000), as the README writes them."""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 10_000:
        value = int(value)
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else json.dumps(value)


def _value(value: Any) -> str:
    """A value as it is written in YAML flow style, in backticks; '' for no default."""
    if value is _NONE:
        return ""
    if value is _REQUIRED:
        return "required"
    return f"`{_flow(value)}`"


def _flow(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value) if str(value) else '""'


if __name__ == "__main__":
    sys.exit(main())
