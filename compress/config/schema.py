"""The JSON Schema of a pipeline file, as users write it: for editors and the generated reference.

Pydantic's own schema generation is the engine, so the schema cannot drift from the models that
validate a pipeline: descriptions, defaults, ranges and choices all come from the fields. What
pydantic cannot see is added here: ``stages`` is a list whose items are one of the stage configs,
chosen by their ``stage:`` key (the loader picks the model the same way, from a registry). The
registry is a parameter because ``compress.config`` never imports ``compress.stages``; callers
pass ``compress.stages.config_registry()``.

Validators that check more than a type (cross-field rules, files that must exist, a torchvision
model name) stay in pydantic only: the schema is a faithful subset, so a file it rejects is one
the loader rejects too, and the loader may still refuse a file the schema accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Union, get_args

from pydantic import Field, create_model
from pydantic.json_schema import GenerateJsonSchema

from compress.config.pipeline import PipelineConfig, StageConfig

DIALECT = "https://json-schema.org/draft/2020-12/schema"
TITLE = "compress pipeline"


class _Generator(GenerateJsonSchema):
    """Pydantic's generator, plus the defaults of ``default_factory`` fields.

    Pydantic leaves such defaults out (a factory might be costly or impure); ours are small pure
    lambdas (``modes: [dynamic, static]``, prune's ``finetune``), and a reference whose default
    column is empty exactly for them would mislead.
    """

    def get_default_value(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()
        return super().get_default_value(schema)


def pipeline_schema(registry: Mapping[str, type[StageConfig]]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a pipeline file whose stages are the ``registry``'s.

    ``registry`` maps each ``stage:`` kind to its config model (``compress.stages.config_registry()``).
    Keys are the YAML keys (aliases: ``from``, not ``from_``); unknown keys are refused everywhere
    (``additionalProperties: false``), as the strict models refuse them.
    """
    document = create_model(
        "PipelineFile",
        __base__=PipelineConfig,
        __doc__=PipelineConfig.__doc__,
        stages=(list[_stage_union(registry)], PipelineConfig.model_fields["stages"]),
    )
    schema = document.model_json_schema(by_alias=True, mode="validation", schema_generator=_Generator)
    _drop_field_titles(schema)
    schema["title"] = TITLE
    return {"$schema": DIALECT, **schema}


def _stage_union(registry: Mapping[str, type[StageConfig]]) -> Any:
    """One of the registry's configs, told apart by ``stage:`` (a ``oneOf`` with a discriminator)."""
    if not registry:
        raise ValueError("the stage registry is empty")
    for kind, config in registry.items():
        field = config.model_fields.get("stage")
        if field is None or get_args(field.annotation) != (kind,):
            raise ValueError(
                f"{config.__name__}.stage must be Literal[{kind!r}] to be told apart by 'stage:'"
            )
    configs = tuple(registry[kind] for kind in sorted(registry))
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="stage")]  # noqa: UP007 - a runtime tuple


def _drop_field_titles(node: Any, in_properties: bool = False) -> None:
    """Remove the titles pydantic makes from field names ("Bn Adapt Batches"): an editor shows the
    title above the description, and the key itself already says it. Model titles stay."""
    if isinstance(node, dict):
        for key, value in node.items():
            if in_properties and isinstance(value, dict):
                value.pop("title", None)
            _drop_field_titles(value, in_properties=key == "properties" and not in_properties)
    elif isinstance(node, list):
        for item in node:
            _drop_field_titles(item)
