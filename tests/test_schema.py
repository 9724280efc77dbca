"""The pipeline JSON Schema and the generated reference: they agree with the loader and stay current.

The schema is what editors check a pipeline against while it is typed, and the reference is what
users read; both are generated from the pydantic models (``compress.config.schema``,
``compress.reference``). These tests hold them to the loader: a file the schema rejects is one
the loader rejects, every key the schema knows is documented, and the committed files are what
the code generates now.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import Field, create_model

from compress import reference
from compress.config.loader import load_pipeline
from compress.config.schema import pipeline_schema
from compress.errors import ConfigError
from compress.stages import config_registry
from compress.stages.report import ReportConfig

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema=../docs/schema/pipeline.schema.json"
PYDANTIC_ONLY = ("gt", "ge", "lt", "le", "multiple_of")  # constraints pydantic failed to translate

GOOD = """\
name: good-minimal
stages:
  - {stage: train, epochs: 1, optimizer: {lr: auto}}
  - {stage: prune, from: baseline, amount: 0.5}
  - {stage: quantize, from: [pruned], modes: [dynamic]}
  - {stage: export}
  - {stage: benchmark, threads: all, batch_sizes: [1]}
  - {stage: gates, rules: [{min_accuracy: 0.5, variants: baseline}]}
  - {stage: report}
"""
TRAIN = "stages:\n  - {stage: train}\n"
BENCH = TRAIN + "  - {stage: benchmark}\n"
# name -> (the file, a word the schema's error names: the key at fault or the value refused)
BAD = {
    "unknown_top_level_key": ("epochs: 3\n" + TRAIN, "epochs"),
    "unknown_stage_key": ("stages:\n  - {stage: train, epoch: 3}\n", "epoch"),
    "unknown_nested_key": ("stages:\n  - {stage: train, optimizer: {lrr: 0.1}}\n", "lrr"),
    "unknown_stage_kind": ("stages:\n  - {stage: trian}\n", "trian"),
    "missing_stage_kind": ("stages:\n  - {epochs: 3}\n", "stage"),
    "wrong_type": ('stages:\n  - {stage: train, epochs: "ten"}\n', "epochs"),
    "negative_bn_adapt_batches": ("stages:\n  - {stage: train, bn_adapt_batches: -1}\n", "bn_adapt_batches"),
    "amount_out_of_range": (TRAIN + "  - {stage: prune, amount: 1.5}\n", "amount"),
    "no_stages": ("stages: []\n", "stages"),
    "unknown_dataset": ("data: {dataset: mnsit}\n" + TRAIN, "dataset"),
    "unsafe_pipeline_name": ("name: ../elsewhere\n" + TRAIN, "name"),
    "zero_learning_rate": ("stages:\n  - {stage: train, optimizer: {lr: 0}}\n", "lr"),
    "repeated_batch_size": (TRAIN + "  - {stage: benchmark, batch_sizes: [1, 1]}\n", "batch_sizes"),
    "qat_bn_adapt_batches": (
        TRAIN + "  - {stage: quantize, modes: [qat], qat: {bn_adapt_batches: 10}}\n",
        "bn_adapt_batches",
    ),
    "export_without_onnx": (TRAIN + "  - {stage: export, targets: [ort]}\n", "targets"),
    "gate_parity_false": (BENCH + "  - {stage: gates, rules: [{require_parity: false}]}\n", "require_parity"),
    "gate_accuracy_percent": (BENCH + "  - {stage: gates, rules: [{min_accuracy: 97}]}\n", "min_accuracy"),
    "gate_negative_flip_rate": (
        BENCH + "  - {stage: gates, rules: [{max_flip_rate: -0.1}]}\n",
        "max_flip_rate",
    ),
    "gate_confidence_one": (
        BENCH + "  - {stage: gates, rules: [{max_accuracy_drop: 1, confidence: 1}]}\n",
        "confidence",
    ),
    "gate_unknown_decide": (
        BENCH + "  - {stage: gates, rules: [{max_class_drop: 5, decide: lowest}]}\n",
        "decide",
    ),
}


@pytest.fixture(scope="module")
def registry() -> dict[str, Any]:
    return config_registry()


@pytest.fixture(scope="module")
def schema(registry: dict[str, Any]) -> dict[str, Any]:
    return pipeline_schema(registry)


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_pipeline_validates_and_names_the_schema(path: Path, validator: Draft202012Validator) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == MODELINE, f"{path.name}: the first line must be the schema modeline"
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(text))]
    assert not errors, "\n".join(errors)


def test_schema_is_strict_described_and_keyed_by_stage(schema: dict[str, Any], registry: dict) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    objects = [schema, *schema["$defs"].values()]
    for node in objects:
        assert node.get("additionalProperties") is False, node.get("title")
        for key, prop in node["properties"].items():
            assert prop.get("description"), f"{node.get('title')}.{key} has no description"
    leaks = [key for key in _all_keys(schema) if key in PYDANTIC_ONLY]
    assert not leaks, f"pydantic constraints left untranslated: {leaks}"
    items = schema["properties"]["stages"]["items"]
    kinds = {_deref(schema, b)["properties"]["stage"]["const"] for b in items["oneOf"]}
    assert kinds == set(registry)
    assert items["discriminator"]["propertyName"] == "stage"
    train = _deref(schema, {"$ref": "#/$defs/TrainConfig"})
    assert "from" in train["properties"] and "from_" not in train["properties"]


def test_reference_documents_every_schema_key(schema: dict[str, Any]) -> None:
    documented = _documented_keys(reference.reference_markdown(schema))
    expected = _schema_keys(schema)
    assert set(documented) == set(expected)
    for section, keys in expected.items():
        assert keys - documented[section] == set(), f"{section}: undocumented keys"
        assert documented[section] - keys == set(), f"{section}: keys the schema does not have"


def test_committed_files_are_current(schema: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    files = reference.generated_files(schema)
    stale = reference.stale_files(REPO, files)
    assert not stale, f"{stale} differ from the code; run python -m compress.reference"
    assert json.loads(files[reference.SCHEMA]) == schema
    assert reference.main(["--check", "--root", str(REPO)]) == 0
    assert capsys.readouterr().err == ""


def test_a_changed_description_makes_the_check_fail(
    tmp_path: Path,
    schema: dict[str, Any],
    registry: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for relative, text in reference.generated_files(schema).items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text, encoding="utf-8")
    assert reference.main(["--check", "--root", str(tmp_path)]) == 0

    old = ReportConfig.model_fields["title"].description
    new = "A description changed in the code but not in the committed docs."
    changed = create_model(  # same name and fields: only the one description differs
        "ReportConfig",
        __base__=ReportConfig,
        __doc__=ReportConfig.__doc__,
        title=(str | None, Field(None, max_length=200, description=new)),
    )
    patched = {**registry, "report": changed}
    patched_schema = pipeline_schema(patched)
    assert reference.schema_text(patched_schema).replace(new, old) == reference.schema_text(schema)
    files = reference.generated_files(patched_schema)
    assert reference.stale_files(tmp_path, files) == [reference.REFERENCE, reference.SCHEMA]

    monkeypatch.setattr("compress.stages.config_registry", lambda: patched)
    capsys.readouterr()
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1
    message = capsys.readouterr().err.strip()
    assert message.splitlines() == [message] and str(reference.REFERENCE) in message
    assert reference.main(["--root", str(tmp_path)]) == 0  # writing brings them up to date
    assert reference.stale_files(tmp_path, files) == []


def test_a_good_pipeline_is_accepted_by_schema_and_loader(
    tmp_path: Path, validator: Draft202012Validator, registry: dict[str, Any]
) -> None:
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(GOOD))]
    assert not errors, errors
    path = tmp_path / "good.yaml"
    path.write_text(GOOD, encoding="utf-8")
    pipeline = load_pipeline(path, registry, [])
    assert [s.stage for s in pipeline.stages][:2] == ["train", "prune"]


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_pipeline_is_rejected_by_schema_and_loader(
    case: str, tmp_path: Path, validator: Draft202012Validator, registry: dict[str, Any]
) -> None:
    text, word = BAD[case]
    errors = list(validator.iter_errors(yaml.safe_load(text)))
    assert errors, f"the schema accepts {case}"
    found = [(path, message) for path, message in _flatten(errors) if word in path or repr(word) in message]
    assert found, f"no schema error names {word!r}: {[e.message for e in errors]}"
    path = tmp_path / f"{case}.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError):
        load_pipeline(path, registry, [])


# ---------------------------------------------------------------- helpers (independent of compress.reference)


def _deref(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    return schema["$defs"][node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node


def _flatten(errors: list[Any]) -> list[tuple[list[Any], str]]:
    """(path, message) of each error and, recursively, of the alternatives a oneOf tried: an error
    in one stage's keys is reported inside the branch its ``stage:`` selects."""
    found = []
    for error in errors:
        found.append((list(error.absolute_path), error.message))
        found += _flatten(list(error.context or []))
    return found


def _all_keys(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [k for k, v in node.items() for k in (k, *_all_keys(v))]
    if isinstance(node, list):
        return [k for v in node for k in _all_keys(v)]
    return []


def _keys(schema: dict[str, Any], model: dict[str, Any], prefix: str = "") -> set[str]:
    """Every key path of a model: ``a.b`` into a section, ``a[].b`` into a list of sections,
    ``a.<key>.b`` into a mapping of sections."""
    found = set()
    for name, prop in model.get("properties", {}).items():
        found.add(prefix + name)
        for member in prop.get("anyOf", [prop]):
            for joint, inner in (
                (".", member),
                ("[].", member.get("items")),
                (".<key>.", member.get("additionalProperties")),
            ):
                if isinstance(inner, dict) and "$ref" in inner:
                    found |= _keys(schema, _deref(schema, inner), f"{prefix}{name}{joint}")
    return found


def _schema_keys(schema: dict[str, Any]) -> dict[str, set[str]]:
    """Section heading -> the key paths the reference must list there."""
    top = schema["properties"]
    expected = {"Top level": set(top), "`data`": _keys(schema, _deref(schema, top["data"]))}
    for branch in top["stages"]["items"]["oneOf"]:
        model = _deref(schema, branch)
        expected[f"Stage `{model['properties']['stage']['const']}`"] = _keys(schema, model)
    return expected


def _documented_keys(markdown: str) -> dict[str, set[str]]:
    """Section heading -> the keys in the first column of its table."""
    sections: dict[str, set[str]] = {}
    heading = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading = line.removeprefix("## ")
            sections[heading] = set()
        elif heading is not None and line.startswith("| `"):
            sections[heading].add(line.split(" | ")[0].removeprefix("| ").strip("`"))
    return sections


def test_run_prints_the_committed_schema(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m compress.run --schema`` is what editors are pointed at: the committed file."""
    from compress.run import main

    assert main(["--schema"]) == 0
    printed = capsys.readouterr().out
    assert printed == (REPO / "docs" / "schema" / "pipeline.schema.json").read_text(encoding="utf-8")
    assert json.loads(printed)["properties"]["stages"]["items"]["oneOf"]
