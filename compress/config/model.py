"""The ``model:`` section: which architecture a stage builds.

Exactly one source: a zoo ``arch``, a torchvision or timm builder by name, or a trusted
``import_path`` factory. ``width``/``hidden``/``dropout`` shape zoo models only; ``weights``
and ``small_stem`` apply to torchvision and timm models.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from compress.config.messages import did_you_mean
from compress.config.safety import IMPORT_PATH, import_factory, input_file
from compress.config.sections import StrictModel

ARCHS = ("lenet300", "lenet5", "resnet20", "mlp")
ZOO_ONLY = ("width", "hidden", "dropout")
WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # a torchvision weights name: DEFAULT, IMAGENET1K_V1, ...
# Left out of the dump when None, so zoo specs (and their cache keys) stay as they were before
# these keys existed. A serializer, not Field(exclude_if=...): that needs pydantic >= 2.12, and
# the [litert] extra holds pydantic at 2.11 (its xdsl pin caps typing-extensions below 4.13).
_OMIT_WHEN_NONE = ("import_path", "torchvision", "timm", "weights", "small_stem")


@lru_cache(maxsize=1)
def torchvision_classifiers() -> tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


class ModelConfig(StrictModel):
    """The architecture: a zoo arch, a torchvision or timm model by name, or your own factory."""

    arch: Literal["lenet300", "lenet5", "resnet20", "mlp", "custom", "torchvision", "timm"] = Field(
        "lenet5",
        description="A zoo architecture (lenet5, lenet300, resnet20, mlp); custom, torchvision and timm "
        "are implied by import_path, torchvision and timm.",
    )
    width: float = Field(1.0, gt=0, le=16, description="Zoo models: channel and neuron multiplier.")
    hidden: list[int] | None = Field(
        None,
        description="Zoo mlp: hidden layer sizes, e.g. [800, 800]; null: two layers of 800 x width.",
        json_schema_extra={"minItems": 1, "items": {"type": "integer", "exclusiveMinimum": 0}},
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Zoo models: dropout before the classifier layers.")
    # TRUSTED CODE: 'package.module:factory', called with the model spec (dict) to build an
    # nn.Module. Imported when the pipeline is validated; implies arch: custom.
    import_path: str | None = Field(
        None,
        description="Trusted code: 'package.module:factory' that builds your nn.Module from the model spec; "
        "imported when the pipeline is validated; implies arch: custom.",
        json_schema_extra={"pattern": f"^{IMPORT_PATH.pattern}$"},
    )
    # a torchvision.models classification builder, e.g. resnet18, mobilenet_v3_small (arch: torchvision)
    torchvision: str | None = Field(
        None,
        description="A torchvision.models classification builder, e.g. resnet18; implies arch: torchvision.",
    )
    # a timm model name, e.g. mobilenetv3_small_100 (arch: timm; pip install -e '.[timm]')
    timm: str | None = Field(
        None,
        description="A timm model name, e.g. mobilenetv3_small_100 (the timm extra); implies arch: timm.",
    )
    # pretrained weights: a state-dict file anywhere readable, or a torchvision weights name
    # (DEFAULT, IMAGENET1K_V1, ...: from torch's hub cache, downloaded when online)
    weights: str | None = Field(
        None,
        description="torchvision/timm: pretrained weights, a state-dict file (absolute, ~/..., or relative "
        "to where you run) or a torchvision weights name such as DEFAULT; null: random initialisation.",
    )
    # stride-1 stem without its max-pool (CIFAR-style); None: for images of at most 64 px
    small_stem: bool | None = Field(
        None,
        description="torchvision/timm: a stride-1 stem without its max-pool (CIFAR-style); null: for images "
        "of at most 64 px.",
    )

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in _OMIT_WHEN_NONE and v is None)}

    @model_validator(mode="before")
    @classmethod
    def _implied_arch(cls, data: Any) -> Any:
        if isinstance(data, dict) and "arch" not in data:
            for key, arch in (("import_path", "custom"), ("torchvision", "torchvision"), ("timm", "timm")):
                if data.get(key) is not None:
                    return {**data, "arch": arch}
        return data

    @field_validator("arch", mode="before")
    @classmethod
    def _known_arch(cls, value: Any) -> Any:
        known = [*ARCHS, "custom", "torchvision", "timm"]
        if isinstance(value, str) and value not in known:
            raise ValueError(
                f"unknown architecture {value!r}{did_you_mean(value, known)}; known: {', '.join(ARCHS)} "
                "(or torchvision: NAME, timm: NAME, or for a model class of your own "
                "import_path: 'package.module:factory')"
            )
        return value

    @field_validator("import_path")
    @classmethod
    def _importable(cls, value: str | None) -> str | None:
        if value is not None:
            import_factory(value, trust=True)
        return value

    @field_validator("torchvision")
    @classmethod
    def _torchvision_name(cls, value: str | None) -> str | None:
        if value is not None and value not in torchvision_classifiers():
            names = torchvision_classifiers()
            raise ValueError(
                f"torchvision has no classification model {value!r}{did_you_mean(value, names)}; "
                f"e.g. {', '.join(n for n in names if n.startswith(('resnet', 'mobilenet')))}"
            )
        return value

    @field_validator("timm")
    @classmethod
    def _timm_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            import timm
        except ImportError:
            raise ValueError("needs the timm package, an optional extra: pip install -e '.[timm]'") from None
        if not timm.is_model(value):
            names = timm.list_models(f"{value.split('_')[0]}*")[:8]
            raise ValueError(f"timm has no model {value!r}{did_you_mean(value, names)}")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_source(cls, value: str | None) -> str | None:
        if value is not None and not WEIGHTS_NAME.fullmatch(value):
            path = input_file(value, "weights")
            if not path.is_file():
                raise ValueError(f"{value}: file not found (looked in {path.parent})")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = {"import_path": self.import_path, "torchvision": self.torchvision, "timm": self.timm}
        given = [k for k, v in sources.items() if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(given)}, not several")
        if self.arch == "custom" and self.import_path is None:
            raise ValueError("arch: custom needs import_path: 'package.module:factory'")
        if self.arch in ("torchvision", "timm") and sources[self.arch] is None:
            raise ValueError(f"arch: {self.arch} needs {self.arch}: NAME")
        if given and self.arch != {"import_path": "custom"}.get(given[0], given[0]):
            raise ValueError(f"give either arch ({self.arch!r}) or {given[0]}, not both")
        if self.arch in ("torchvision", "timm", "custom"):
            zoo_keys = [k for k in ZOO_ONLY if k in self.model_fields_set]
            if zoo_keys:
                raise ValueError(f"{', '.join(zoo_keys)} shape(s) zoo models only, not {self.arch} models")
        else:
            named = [k for k in ("weights", "small_stem") if k in self.model_fields_set]
            if named:
                raise ValueError(f"{', '.join(named)} apply to torchvision and timm models only")
        if self.arch == "timm" and self.weights is not None and WEIGHTS_NAME.fullmatch(self.weights):
            raise ValueError("weights: timm models take a local file (its hub download is not used)")
        return self

    @field_validator("hidden")
    @classmethod
    def _positive_hidden(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(h <= 0 for h in value)):
            raise ValueError("hidden must be a non-empty list of positive layer sizes")
        return value

    def spec(self) -> dict[str, Any]:
        return self.model_dump()

    @property
    def label(self) -> str:
        """What the model is, for logs: 'lenet5', 'torchvision resnet18', ..."""
        if self.arch in ("torchvision", "timm"):
            return f"{self.arch} {self.torchvision or self.timm}"
        return self.import_path if self.arch == "custom" else self.arch
