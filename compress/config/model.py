"""The ``model:`` section: which architecture a stage builds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from compress.config.messages import did_you_mean
from compress.config.safety import import_factory
from compress.config.sections import StrictModel

ARCHS = ("lenet300", "lenet5", "resnet20", "mlp")


class ModelConfig(StrictModel):
    arch: Literal["lenet300", "lenet5", "resnet20", "mlp", "custom"] = "lenet5"
    width: float = Field(1.0, gt=0, le=16)
    hidden: list[int] | None = None
    dropout: float = Field(0.0, ge=0, lt=1)
    # TRUSTED CODE: 'package.module:factory', called with the model spec (dict) to build an
    # nn.Module. Imported when the pipeline is validated; implies arch: custom.
    import_path: str | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="before")
    @classmethod
    def _custom_arch(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("import_path") is not None and "arch" not in data:
            return {**data, "arch": "custom"}
        return data

    @field_validator("arch", mode="before")
    @classmethod
    def _known_arch(cls, value: Any) -> Any:
        known = [*ARCHS, "custom"]
        if isinstance(value, str) and value not in known:
            raise ValueError(
                f"unknown architecture {value!r}{did_you_mean(value, known)}; known: {', '.join(ARCHS)} "
                "(for a model class of your own give import_path: 'package.module:factory' instead)"
            )
        return value

    @field_validator("import_path")
    @classmethod
    def _importable(cls, value: str | None) -> str | None:
        if value is not None:
            import_factory(value, trust=True)
        return value

    @model_validator(mode="after")
    def _arch_or_import(self) -> ModelConfig:
        if self.arch == "custom" and self.import_path is None:
            raise ValueError("arch: custom needs import_path: 'package.module:factory'")
        if self.import_path is not None and self.arch != "custom":
            raise ValueError(f"give either arch ({self.arch!r}) or import_path, not both")
        return self

    @field_validator("hidden")
    @classmethod
    def _positive_hidden(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(h <= 0 for h in value)):
            raise ValueError("hidden must be a non-empty list of positive layer sizes")
        return value

    def spec(self) -> dict[str, Any]:
        return self.model_dump()
