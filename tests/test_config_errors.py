"""Bad pipeline files and overrides: exit 2, one message naming the file and key, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.run import main
from tests.conftest import TINY_PIPELINE, run_cli, write_pipeline

GOOD = TINY_PIPELINE

# (case id, file text, override list, words the message must contain)
CASES = [
    ("unknown-top-level-key", GOOD + "colour: blue\n", [], ["colour", "unknown key"]),
    (
        "misspelt-stage-key",
        GOOD.replace("epochs: 1", "epoch: 1"),
        [],
        ["stages[0] (train).epoch", "did you mean 'epochs'"],
    ),
    (
        "misspelt-stage-name",
        GOOD.replace("stage: train", "stage: trian"),
        [],
        ["stages[0].stage", "did you mean 'train'"],
    ),
    ("wrong-type", GOOD.replace("epochs: 1", "epochs: lots"), [], ["stages[0] (train).epochs", "integer"]),
    ("zero-epochs", GOOD.replace("epochs: 1", "epochs: 0"), [], ["stages[0] (train).epochs", "greater than"]),
    ("negative-epochs", GOOD.replace("epochs: 1", "epochs: -3"), [], ["(train).epochs"]),
    ("huge-epochs", GOOD.replace("epochs: 1", "epochs: 1000000000"), [], ["(train).epochs", "less than"]),
    ("unknown-dataset", GOOD.replace("dataset: mnist", "dataset: imagenet"), [], ["data.dataset", "mnist"]),
    (
        "unknown-model",
        GOOD.replace("arch: lenet5", "arch: vgg16"),
        [],
        ["stages[0] (train).model.arch", "lenet5"],
    ),
    ("empty-file", "", [], ["empty"]),
    ("not-a-mapping", "- just\n- a list\n", [], ["top level must be a mapping"]),
    ("yaml-syntax", GOOD.replace("epochs: 1", "epochs: [1"), [], ["YAML syntax error", "tiny.yaml:"]),
    ("no-stages", "seed: 0\n", [], ["stages", "missing"]),
    (
        "duplicate-stage-names",
        GOOD + "  - stage: train\n    epochs: 1\n",
        [],
        ["duplicate stage name 'train'"],
    ),
    (
        "from-unknown-variant",
        GOOD + "  - stage: train\n    name: again\n    from: teacher\n",
        [],
        ["stages[1] (again).from", "no earlier stage produces variant 'teacher'"],
    ),
    ("bad-set-syntax", GOOD, ["epochs"], ["--set epochs", "KEY=VALUE"]),
    ("bad-set-path", GOOD, ["trian.epochs=2"], ["--set trian.epochs=2", "did you mean 'train'"]),
    ("bad-set-type", GOOD, ["train.epochs=many"], ["(train).epochs", "integer"]),
    ("bad-set-index", GOOD, ["stages[5].epochs=2"], ["stages[5]"]),
    ("negative-limit", GOOD.replace("limit_train: 2000", "limit_train: -1"), [], ["data.limit_train"]),
    (
        "alias-bomb",
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
        "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
        "stages: [*e]\n",
        [],
        ["anchors/aliases"],
    ),
    ("bad-name", "name: ../../etc\n" + GOOD, [], ["name", "letters, digits"]),
]


@pytest.mark.parametrize("case, text, overrides, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_2_naming_the_key(
    case: str,
    text: str,
    overrides: list[str],
    expected: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pipeline = write_pipeline(tmp_path, text)
    args = [str(pipeline), "--validate"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {pipeline}") or err.startswith("error: --set"), err
    for words in expected:
        assert words in err, f"{words!r} not in {err!r}"
    assert "Traceback" not in err


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.yaml"), "--validate"]) == 2
    assert "nope.yaml: file not found" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback_and_writes_nothing(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, GOOD.replace("epochs: 1", "epochs: 0"))
    result = run_cli(pipeline, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "artifacts").exists()


def test_missing_data_root_exits_2(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, GOOD)
    result = run_cli(pipeline, "--data-root", tmp_path / "missing", cwd=tmp_path)
    assert result.returncode == 2
    assert "missing" in result.stderr and "--data-root" in result.stderr
    assert "Traceback" not in result.output


def test_set_overrides_are_typed_by_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compress.config import load_pipeline
    from compress.stages import config_registry

    pipeline = write_pipeline(tmp_path, GOOD)
    loaded = load_pipeline(
        pipeline,
        config_registry(),
        ["train.epochs=3", "stages[0].optimizer.lr=1e-3", "data.limit_test=null", "seed=7"],
    )
    train = loaded.stages[0]
    assert train.epochs == 3 and isinstance(train.epochs, int)
    assert train.optimizer.lr == pytest.approx(1e-3)
    assert loaded.config.data.limit_test is None
    assert loaded.config.seed == 7
