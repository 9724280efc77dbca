"""The pipeline YAML: its schema, loading, overrides and error messages.

Errors read like the YAML path the user has to edit
(``pipelines/x.yaml: stages[2] (prune).amount: ...``) because that is what they will search
for in their editor. Stage-specific schemas live beside each stage; this module gets them
handed in as a registry so that it never imports the stages.
"""

from __future__ import annotations

import difflib
import importlib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from compress.errors import ConfigError

DATASETS = ("mnist", "fashion_mnist", "cifar10")
ARCHS = ("lenet300", "lenet5", "resnet20", "mlp")
MAX_EPOCHS = 10_000
MAX_YAML_BYTES = 1_000_000
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 50
SHALLOW = "a pipeline file is only a few levels deep"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SAFE_NAME_TEXT = "may hold only letters, digits, '.', '_' and '-' (it becomes a file name)"
IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")

_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
_QUERY_PASSWORD = re.compile(r"(?i)(?P<key>[?&;](?:password|passwd|pwd)=)(?P<pw>[^&\s]*)")


def safe_name(value: str | None) -> str | None:
    """``value`` unchanged if it can be a file or directory name; ValueError naming the rule if not."""
    if value is not None and not SAFE_NAME.fullmatch(value):
        raise ValueError(f"{SAFE_NAME_TEXT}, got {value!r}")
    return value


def mask_secrets(text: str) -> str:
    """``postgresql://me:secret@host/db`` -> ``postgresql://me:***@host/db`` (also ``?password=``)."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['key']}***", text)


# ``model.import_path`` values named by a pipeline validated in this process. Model files
# record their import path so they can be rebuilt, but a file alone never makes us import
# code: ``models.build_model`` imports only what a pipeline the user runs names (trusted code).
_TRUSTED_IMPORTS: set[str] = set()


def import_factory(path: str, trust: bool = False):  # noqa: ANN201 - returns the user's callable
    """The callable ``package.module:factory`` names; ``trust`` records it as named by a pipeline.

    Raises ValueError (with what to do) when the text is malformed or the import fails, and
    PermissionError when the path was never named by a validated pipeline.
    """
    if not IMPORT_PATH.fullmatch(path):
        raise ValueError(f"{path!r} is not 'package.module:factory' (e.g. 'mymodels.nets:build')")
    if not trust and path not in _TRUSTED_IMPORTS:
        raise PermissionError(path)
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error it raises is theirs to fix
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"cannot import {module_name!r} ({type(exc).__name__}: {first}); the module must be "
            "importable from the working directory or an installed package"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")
    if trust:
        _TRUSTED_IMPORTS.add(path)
    return factory


def project_file(text: str, key: str) -> Path:
    """A file path a pipeline gives, which must stay inside the project (the working directory).

    Relative to the working directory; absolute paths and ``..`` that climb out of it are
    refused, so a pipeline received from someone else cannot make a run read arbitrary files.
    To use a file from elsewhere, copy or symlink it into the project (a deliberate act).
    Raises ValueError naming ``key``.
    """
    if not text.strip():
        raise ValueError(f"{key}: is empty; give a file path relative to the directory you run from")
    raw = Path(text).expanduser() if text.startswith("~") else Path(text)
    parts = raw.parts
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            break
    if raw.is_absolute() or depth < 0:
        raise ValueError(
            f"{key}: {text!r} is outside the project directory; give a path relative to the directory "
            "you run from, without '..' (copy or symlink the file into the project to use it)"
        )
    return Path.cwd() / raw


class StrictModel(BaseModel):
    """Base for every YAML section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DataConfig(StrictModel):
    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"
    root: str | None = None
    val_size: int = Field(5000, ge=0, le=1_000_000)
    split_seed: int = 0
    limit_train: int | None = Field(None, gt=0)
    limit_test: int | None = Field(None, gt=0)
    download: bool = True
    batch_size: int = Field(128, gt=0, le=65536)


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


class OptimizerConfig(StrictModel):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, lt=1)


class TrainingConfig(StrictModel):
    """Shared by every stage that trains or fine-tunes a model."""

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    batch_size: int | None = Field(None, gt=0, le=65536)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: Literal["constant", "cosine", "onecycle"] = "onecycle"
    warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: Literal["none", "shift", "crop_flip"] = "none"
    amp: bool = True  # false: train in fp32 everywhere (the same as precision: fp32)
    # auto: mixed precision on CUDA (bf16 where the GPU supports it, else fp16 with a grad
    # scaler), fp32 on a CPU. bf16/fp16 need a CUDA device; fp32 turns mixed precision off.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_ends_before_training(cls, value: float, info: Any) -> float:
        epochs = info.data.get("epochs")
        if value and isinstance(epochs, int) and value >= epochs:
            raise PydanticCustomError(
                "warmup",
                "{value} is not less than epochs ({epochs}): the learning rate would never leave its "
                "warm-up; use warmup_epochs: 0 for short runs",
                {"value": value, "epochs": epochs},
            )
        return value

    @field_validator("precision")
    @classmethod
    def _amp_agrees_with_precision(cls, value: str, info: Any) -> str:
        if value in ("bf16", "fp16") and info.data.get("amp") is False:
            raise PydanticCustomError(
                "precision", "asks for mixed precision but amp is false; drop amp: false or use fp32"
            )
        return value


class SoftLabels(StrictModel):
    """Knowledge distillation from a teacher during fine-tuning (Hinton et al. 2015).

    A pruned model fine-tuned against its own unpruned input's soft labels, not the hard
    labels alone, recovers more of the input's accuracy: the teacher's logits carry which
    wrong classes are close, which the pruned weights have to relearn.
    """

    temperature: float = Field(4.0, gt=0, le=1000)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft term; 0 is plain cross-entropy


class StageConfig(StrictModel):
    """Fields every stage has. Stages subclass it with their own settings.

    ``produces`` and ``consumes`` let the whole pipeline be checked before anything runs:
    a ``from:`` that names a variant no earlier stage makes is a config error, not a crash
    twenty minutes in.
    """

    stage: str
    name: str | None = None
    from_: list[str] | None = Field(None, alias="from")
    # A tune stage may target this stage: its run skips the test split when ``ctx.tuning``.
    tunable: ClassVar[bool] = False

    @field_validator("from_", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _safe_stage_name(cls, value: str | None) -> str | None:
        return safe_name(value)  # a directory under artifacts/ and a file name under reports/

    @property
    def label(self) -> str:
        return self.name or self.stage

    def consumes(self, available: list[str]) -> list[str]:
        """Variant names this stage reads, given those made by earlier stages."""
        return list(self.from_) if self.from_ is not None else []

    def produces(self, inputs: list[str]) -> list[str]:
        """Variant names this stage adds, given the names it consumes."""
        return []

    def check(self, pipeline: PipelineConfig) -> None:
        """Cross-checks that need the rest of the pipeline; raise ValueError with the key."""


class PipelineConfig(StrictModel):
    name: str | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    stages: list[Any] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        return safe_name(value)


class Pipeline(BaseModel):
    """A validated pipeline: where it came from and its typed stages."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: Path
    name: str
    config: PipelineConfig
    raw: dict[str, Any]

    @property
    def stages(self) -> list[StageConfig]:
        return self.config.stages


# ---------------------------------------------------------------- loading


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


# ---------------------------------------------------------------- overrides and paths

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


def locate(raw: dict[str, Any], path: str) -> tuple[Any, str | int]:
    """Find the container and key that ``path`` names in raw YAML data.

    Accepts ``stages[0].epochs``, ``stages.train.epochs`` and the short ``train.epochs``
    (a stage by its name). Used by ``--set`` and by the tune stage's search space.
    """
    parts = split_path(path)
    stages = raw.get("stages")
    if isinstance(parts[0], str) and parts[0] not in raw and isinstance(stages, list):
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
        node, last = locate(raw, key.strip())
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None
    if isinstance(node, list) and isinstance(last, int) and last >= len(node):
        raise ConfigError(f"{where}: index {last} is past the end ({len(node)} items)")
    try:
        parsed = parse_override_value(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: value is not valid YAML ({exc})") from None
    node[last] = parsed


# ---------------------------------------------------------------- validation


def validate_pipeline(raw: dict[str, Any], path: Path, registry: Mapping[str, type[StageConfig]]) -> Pipeline:
    try:
        top = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc, PipelineConfig, prefix="")) from None

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
            problems.append(_format_errors(None, exc, registry[kind], prefix=label))
    if problems:
        raise ConfigError(_join(path, problems))

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
        raise ConfigError(_join(path, problems))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(path: Path, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{path}: {problems[0]}"
    return f"{path}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)


def _format_errors(path: Path | None, exc: ValidationError, model: type[BaseModel], prefix: str) -> str:
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
    return _join(path, lines)


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
