"""Bad input and safety: every malformed pipeline in ``tests/bad_inputs/`` exits 2 with one
message naming the file and the key, without a traceback and without writing anything; model
files never make us unpickle or import code; credentials never reach a log or a report.

Each corpus file starts with a comment saying what is wrong (``# args: ...`` adds command-line
arguments). Cases run in-process through ``compress.run.main`` (fast); three also run as real
subprocesses to prove the exit code and the absence of a traceback end to end.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compress import config, models, verify
from compress.config import load_pipeline
from compress.errors import ArtifactError
from compress.run import main
from compress.ship import verify as ship_verify
from compress.ship.targets import TARGETS, child
from compress.stages import config_registry
from tests.conftest import REPO, TINY_PIPELINE, write_pipeline

CORPUS = Path(__file__).parent / "bad_inputs"
OUT_ARGS = ["--artifacts", "tmp/artifacts", "--reports", "tmp/reports"]

# corpus file -> fragments the one error message must contain (besides the file's path)
EXPECTED: dict[str, list[str]] = {
    "empty.yaml": ["the file is empty", "needs at least 'stages:'"],
    "not_a_mapping.yaml": ["top level must be a mapping", "not list"],
    "yaml_syntax.yaml": [
        "yaml_syntax.yaml:9:15: YAML syntax error: expected ',' or ']'",
        "flow sequence that starts at line 8, column 13",
    ],
    "unknown_top_level_key.yaml": ["colour: unknown key", "allowed keys: name, seed"],
    "misspelt_stage_type.yaml": ["stages[0].stage: unknown stage 'trian'", "did you mean 'train'?"],
    "misspelt_stage_key.yaml": ["stages[0] (train).epoch: unknown key", "did you mean 'epochs'?"],
    "misspelt_nested_key.yaml": ["stages[0] (train).optimizer.lrr: unknown key", "did you mean 'lr'?"],
    "wrong_type_epochs.yaml": ["stages[0] (train).epochs: Input should be a valid integer", "(got 'lots')"],
    "wrong_type_section.yaml": ["data: should be a mapping of keys and values, not str (got 'mnist')"],
    "zero_epochs.yaml": ["stages[0] (train): epochs: 0 trains nothing; give init: a weights file"],
    "negative_epochs.yaml": ["stages[0] (train).epochs: Input should be greater than or equal to 0 (got -3)"],
    "huge_epochs.yaml": [
        "stages[0] (train).epochs: Input should be less than or equal to 10000 (got 1000000000)",
        "the upper bound catches typos",
    ],
    "warmup_longer_than_training.yaml": [
        "stages[0] (train).warmup_epochs: 2.0 is not less than epochs (2)",
        "use warmup_epochs: 0 for short runs",
    ],
    "negative_limit.yaml": ["data.limit_train: Input should be greater than 0 (got -1)"],
    "sparsity_one.yaml": ["stages[1] (prune).amount: Input should be less than 1 (got 1.0)", "a fraction"],
    "unknown_dataset.yaml": [
        "data.dataset: Input should be 'mnist', 'fashion_mnist', 'kmnist'",
        "'imagefolder'",
    ],
    "unknown_model.yaml": [
        "stages[0] (train).model.arch: unknown architecture 'lenet6'",
        "did you mean 'lenet5'?",
        "import_path",
    ],
    "from_unknown_variant.yaml": ["stages[1] (prune).from: no earlier stage produces variant 'teacher'"],
    "duplicate_stage_names.yaml": [
        "stages[1] (train).name: duplicate stage name 'train'",
        "distinct 'name:'",
    ],
    "no_stages.yaml": ["stages: required key is missing"],
    "stage_not_a_mapping.yaml": ["stages[1]: must be a mapping with a 'stage:' key"],
    "tune_space_unknown_path.yaml": [
        "stages[1] (tune).space.finetune.epochz:",
        "finetune.epochz: unknown key (did you mean 'epochs'?)",
    ],
    "storage_unknown_scheme.yaml": [
        "stages[1] (tune).storage: unknown database scheme 'mongodb'",
        "sqlite:///study.db",
        "tuner:***@db.example",
    ],
    "gate_unknown_metric.yaml": [
        "stages[3] (gates).rules[0].max_acuracy_drop: unknown key",
        "did you mean 'max_accuracy_drop'?",
    ],
    "cuda_without_gpu.yaml": ["device: 'cuda' was requested but no CUDA device is available", "cpu"],
    "data_root_missing.yaml": ["no-such-datasets (from data.root) does not exist", "MNIST/raw"],
    "deeply_nested.yaml": ["nested too deeply to read"],
    "nested_60_levels.yaml": ["nested_60_levels.yaml:3:59: nested more than 50 levels deep"],
    "duplicate_key.yaml": [
        "duplicate_key.yaml:13:5: duplicate key 'epochs' (first on line 12)",
        "keep only the last one",
    ],
    "alias_bomb.yaml": ["expands to more than 100000 values (anchors/aliases?)"],
    "init_home_missing.yaml": [
        "stages[0] (train).init: ~/no-such-models/resnet18.pth: file not found (looked in",
        "no-such-models)",
    ],
    "init_absolute_not_a_checkpoint.yaml": [
        "stages[0] (train).init:",
        "/etc/passwd: not a readable checkpoint",
    ],
    "init_missing_file.yaml": ["stages[0] (train).init: models/missing.pt: file not found"],
    "init_not_a_checkpoint.yaml": ["stages[0] (train).init:", "not-a-model.pt: not a readable checkpoint"],
    "init_pickle_with_code.yaml": [
        "stages[0] (train).init:",
        "evil.pt: not a readable checkpoint (it holds Python objects other than tensors",
    ],
    "init_state_does_not_fit.yaml": [
        "stages[0] (train).init: plain-state.pt does not fit lenet5: 8 missing keys: classifier.bias",
        "1 unexpected keys: weight",
    ],
    "init_without_state_dict.yaml": [
        "stages[0] (train).init: no-state.pt holds no state dict (keys: epoch, note)",
        "torch.save(model.state_dict(), path)",
    ],
    "stage_name_path.yaml": ["stages[0] (../../../etc/cron.d/x).name: may hold only letters, digits"],
    "pipeline_name_path.yaml": ["name: may hold only letters, digits", "got '../../etc'"],
    "output_name_path.yaml": ["stages[0] (train).output: variant name may hold only", "'../../outside'"],
    "import_path_missing_module.yaml": [
        "stages[0] (train).model.import_path: cannot import 'no_such_package.nets'",
        "ModuleNotFoundError",
    ],
    "import_path_not_a_path.yaml": [
        "stages[0] (train).model.import_path:",
        "is not 'package.module:factory'",
    ],
    "torchvision_unknown_model.yaml": [
        "stages[0] (train).model.torchvision: torchvision has no classification model 'resnet81'",
        "did you mean 'resnet18'?",
    ],
    "torchvision_with_width.yaml": [
        "stages[0] (train).model: width shape(s) zoo models only, not torchvision models"
    ],
    "import_path_and_arch.yaml": ["stages[0] (train).model: give either arch ('lenet5') or import_path"],
    "bad_set_syntax.yaml": ["--set epochs: expected KEY=VALUE"],
    "bad_set_path.yaml": ["--set trian.epochs=2:", "did you mean 'train'?"],
    "bad_set_type.yaml": ["stages[0] (train).epochs: Input should be a valid integer", "(got 'many')"],
    "bad_set_index.yaml": ["--set stages[5].epochs=2: 'stages.5' does not exist (stages has 1 item)"],
}
# messages about a --set argument name the argument, not the file
NAMES_THE_ARGUMENT = {"bad_set_syntax.yaml", "bad_set_path.yaml", "bad_set_index.yaml"}
SUBPROCESS_CASES = ["yaml_syntax.yaml", "init_pickle_with_code.yaml", "data_root_missing.yaml"]


class Marker:
    """Unpickling this calls ``open(path, 'w')``: a file that appears proves code ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _case_files(cwd: Path) -> Path:
    """The files the init cases point at, written into the working directory."""
    (cwd / "not-a-model.pt").write_text("this is a text file, not a checkpoint\n")
    marker = cwd / "code-ran"
    with open(cwd / "evil.pt", "wb") as handle:
        pickle.dump({"format": "compress.model/1", "state": Marker(marker)}, handle)
    torch.save({"weight": torch.zeros(3)}, cwd / "plain-state.pt")
    torch.save({"epoch": 3, "note": "no weights here"}, cwd / "no-state.pt")
    return marker


def _small(text: str, train: int) -> str:
    """The tiny pipeline with fewer images: evaluation dominates these in-process runs."""
    for key, value in (("limit_train", train), ("val_size", 200), ("limit_test", 200)):
        text, n = re.subn(rf"{key}: \d+", f"{key}: {value}", text)
        assert n == 1, key
    return text


def _args(path: Path) -> list[str]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# args: "):
            return shlex.split(line[len("# args: ") :])
    return []


def _nothing_written(cwd: Path) -> None:
    written = [p for p in (cwd / "tmp").rglob("*")] if (cwd / "tmp").exists() else []
    assert not written, f"files written for bad input: {written}"


def _check_message(name: str, text: str) -> None:
    assert text.startswith("error: "), text
    assert "Traceback" not in text
    if name not in NAMES_THE_ARGUMENT:
        assert f"{CORPUS / name}" in text, f"the message does not name the file: {text!r}"
    for fragment in EXPECTED[name]:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def test_corpus_is_complete_and_documented() -> None:
    files = sorted(p.name for p in CORPUS.glob("*.yaml"))
    assert files == sorted(EXPECTED), set(files) ^ set(EXPECTED)
    assert len(files) >= 25
    for name in files:
        first = (CORPUS / name).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# ") and len(first) > 10, f"{name}: no leading comment saying what is wrong"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_pipeline_exits_2_naming_file_and_key(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COMPRESS_DATA_ROOT", raising=False)  # it would beat data.root
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    marker = _case_files(tmp_path)
    path = CORPUS / name
    code = main([str(path), *OUT_ARGS, *_args(path)])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    _check_message(name, err.strip())
    assert "Traceback" not in out
    assert "hunter2" not in out + err
    assert not marker.exists(), "unpickling ran code"
    _nothing_written(tmp_path)


@pytest.mark.slow
def test_bad_pipelines_in_real_processes(tmp_path: Path) -> None:
    """Started together: each interpreter spends seconds importing torch, mostly in parallel."""
    env = {**os.environ, "COMPRESS_DATA_ROOT": "", "PYTHONUNBUFFERED": "1"}
    running = {}
    for name in SUBPROCESS_CASES:
        cwd = tmp_path / name.removesuffix(".yaml")
        cwd.mkdir()
        marker = _case_files(cwd)
        path = CORPUS / name
        command = [sys.executable, "-m", "compress.run", str(path), *OUT_ARGS, *_args(path)]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        running[name] = (subprocess.Popen(command, cwd=cwd, env=env, **pipes), cwd, marker)
    for name, (proc, cwd, marker) in running.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, out + err
        assert out == ""
        assert err.count("\n") == 1, err  # one line: no traceback, no warning
        _check_message(name, err.strip())
        assert not marker.exists()
        _nothing_written(cwd)


# ---------------------------------------------------------------- other CLI input


def test_bad_command_line_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([str(tmp_path / "nope.yaml"), "--validate"]) == 2
    assert "nope.yaml: file not found" in capsys.readouterr().err
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE)
    assert main([str(pipeline), *OUT_ARGS, "--data-root", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"{pipeline}: data root {tmp_path / 'missing'} (from --data-root) does not exist" in err
    assert main([str(pipeline), *OUT_ARGS, "--device", "cuda"]) == 2 or torch.cuda.is_available()
    assert "--device: 'cuda' was requested" in capsys.readouterr().err or torch.cuda.is_available()
    assert main([str(pipeline), *OUT_ARGS, "--storage", "redis://me:hunter2@cache/0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --storage: unknown database scheme 'redis' in 'redis://me:***@cache/0'")
    assert "hunter2" not in err
    _nothing_written(tmp_path)


def test_set_overrides_are_typed_by_the_schema(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, TINY_PIPELINE)
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


# ---------------------------------------------------------------- verify: bundles that are not what they say


def _bundle(directory: Path) -> Path:
    """A real two-file deploy bundle (a 4->3 linear ONNX model), built without torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir()
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, directory / "model.onnx")
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.save(directory / "sample_input.npy", x)
    np.save(directory / "model.expected.npy", x @ w + b)
    index = {
        "format": ship_verify.BUNDLE_FORMAT,
        "sample_input": "sample_input.npy",
        "models": [{"file": "model.onnx", "expected": "model.expected.npy", "atol": 1e-4}],
    }
    (directory / "bundle.json").write_text(json.dumps(index))
    _reseal(directory)
    return directory


def _reseal(directory: Path) -> None:
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != "SHA256SUMS"
    ]
    (directory / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_verify_refuses_what_is_not_a_bundle_or_not_onnx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle(tmp_path / "deploy")
    assert verify.main([str(bundle)]) == 0, capsys.readouterr()
    assert "verify: OK" in capsys.readouterr().out

    # an ONNX file that is not ONNX (its checksum matches: someone re-sealed it)
    (bundle / "model.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf ModelProto" * 10)
    _reseal(bundle)
    assert verify.main([str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.onnx: not a model ONNX (onnxruntime) can load"), err
    assert "Traceback" not in err

    # an index entry that points out of the bundle is refused before anything is opened
    index = json.loads((bundle / "bundle.json").read_text())
    index["models"][0]["file"] = "../../etc/passwd"
    (bundle / "bundle.json").write_text(json.dumps(index))
    assert verify.main([str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "models[0].file: '../../etc/passwd' is not a file name inside the bundle" in err

    index["models"][0] = {"file": "model.onnx", "expected": "model.expected.npy", "atol": "tight"}
    (bundle / "bundle.json").write_text(json.dumps(index))
    assert verify.main([str(bundle)]) == 2
    assert "models[0].atol: 'tight' is not a tolerance" in capsys.readouterr().err


def test_verify_names_a_missing_and_an_edited_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle(tmp_path / "deploy")
    expected = np.load(bundle / "model.expected.npy")
    np.save(bundle / "model.expected.npy", expected + 1)  # edited after sealing
    assert verify.main([str(bundle)]) == 1
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith("model.expected.npy"))
    assert "MISMATCH" in row and "content changed" in row
    assert "FAILED: model.onnx, model.expected.npy" in err or "FAILED: model.expected.npy" in err

    (bundle / "model.onnx").unlink()
    assert verify.main([str(bundle)]) == 1
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith("model.onnx"))
    assert "MISSING" in row and "model.onnx" in err and "Traceback" not in out + err


# ---------------------------------------------------------------- safety: nothing unsafe is loaded


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found.append((ast.unparse(node.func), node))
    return found


# Modules allowed to import code by name: the stage modules of this package, the measure
# package's own submodules (loaded on first use, names from a fixed table), and the
# model.import_path factory (trusted code a pipeline names).
ALLOWED_IMPORTS = {"compress/stages/__init__.py", "compress/measure/__init__.py", "compress/config/safety.py"}
# TorchScript and torch.export files are made by our own stages and read back from the
# hash-checked cache only, never from a path a user gives (torch.export.load may unpickle).
ALLOWED_PROGRAM_LOADS = {
    "compress/ship/convert.py",
    "compress/quantization/torchao.py",
    "compress/ship/runtimes.py",  # the benchmark stage's runners
}
ALLOWED_SAVES = {  # plain dicts of tensors only
    "compress/models/files.py",
    "compress/checkpoints.py",  # fit's epoch checkpoint
    "compress/data/source.py",
}


def unsafe_calls(rel: str, source: str) -> list[str]:
    """Calls in ``source`` that could load or run code from a file or a string."""
    problems = []
    for name, call in _calls(ast.parse(source)):
        where = f"{rel}:{call.lineno}: {name}"
        flags = {k.arg: ast.unparse(k.value) for k in call.keywords}
        if name == "torch.load" and flags.get("weights_only") != "True":
            problems.append(f"{where} without weights_only=True")
        elif name in ("eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads"):
            problems.append(where)
        elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            problems.append(where)
        elif name == "yaml.compose" and flags.get("Loader") != "yaml.SafeLoader":
            problems.append(f"{where} without Loader=yaml.SafeLoader")
        elif name.endswith("import_module") and rel not in ALLOWED_IMPORTS:
            problems.append(where)
        elif name == "torch.save" and rel not in ALLOWED_SAVES:
            problems.append(f"{where}: save models with models.save_model (spec + state dict)")
        elif name in ("torch.jit.load", "torch.export.load") and rel not in ALLOWED_PROGRAM_LOADS:
            problems.append(where)
        elif name in ("np.load", "numpy.load") and flags.get("allow_pickle") != "False":
            problems.append(f"{where} without allow_pickle=False")
    return problems


def test_source_loads_nothing_unsafely() -> None:
    """torch.load only with weights_only=True; torch.save only of plain dicts (save_model and
    training checkpoints); YAML only through the safe loader; no eval/exec; pickle only through
    the arrays-only unpickler; dynamic imports only where documented."""
    bad = (
        "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(t)\neval('1')\n"
        "np.load(f)\ntorch.save(model, p)\nimportlib.import_module(m)\n"
        "yaml.compose(t)\ntorch.export.load(p)\n"
    )
    assert len(unsafe_calls("compress/x.py", bad)) == 9  # the checker itself catches each kind
    problems = []
    files = sorted((REPO / "compress").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        problems += unsafe_calls(rel, path.read_text(encoding="utf-8"))
    for target in TARGETS.values():
        problems += unsafe_calls(f"verify child for {target.name}", child.program(target))
    assert not problems, "\n".join(problems)


def test_checkpoints_with_code_are_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "compress.model/1", "spec": {"arch": "lenet5"}, "state": Marker(marker)}, evil)
    for loader in (models.load_checkpoint, models.load_model):
        with pytest.raises(ArtifactError, match="not a readable checkpoint"):
            loader(evil)
    assert not marker.exists()

    truncated = tmp_path / "truncated.pt"
    spec = {"arch": "lenet5", "width": 0.25, "in_channels": 1, "image_size": 28, "num_classes": 10}
    models.save_model(models.build_model(spec), spec, tmp_path / "good.pt")
    truncated.write_bytes((tmp_path / "good.pt").read_bytes()[:500])
    with pytest.raises(ArtifactError, match="truncated.pt: not a readable checkpoint"):
        models.load_model(truncated)
    for payload in (
        {"format": "compress.model/1", "spec": "lenet5", "state": {}},
        {"format": "compress.model/1", "spec": {"arch": "lenet5"}, "state": {"w": [1, 2]}},
        {"format": "compress.model/1", "spec": {"arch": "lenet5"}, "state": {}},  # no shapes in the spec
    ):
        torch.save(payload, tmp_path / "odd.pt")
        with pytest.raises(ArtifactError, match="odd.pt"):
            models.load_model(tmp_path / "odd.pt")


def test_pruned_models_are_spec_and_state_dict_and_reload_without_code(tmp_path: Path) -> None:
    """A channel-pruned model (narrower layers than its spec says) is saved as plain data and
    rebuilt from the registry: torch.load(weights_only=True) sees only tensors and builtins."""
    spec = {"arch": "lenet5", "width": 0.5, "in_channels": 1, "image_size": 28, "num_classes": 10}
    torch.manual_seed(0)
    model = models.build_model(spec)
    conv, nxt = model.features[3], model.head[0]  # keep 7 of conv2's 25 output channels
    keep = torch.arange(7)
    slim_conv = torch.nn.Conv2d(conv.in_channels, 7, 5)
    slim_conv.weight.data, slim_conv.bias.data = conv.weight.data[keep].clone(), conv.bias.data[keep].clone()
    columns = torch.arange(nxt.in_features).view(conv.out_channels, -1)[keep].flatten()
    slim_next = torch.nn.Linear(len(columns), nxt.out_features)
    slim_next.weight.data, slim_next.bias.data = nxt.weight.data[:, columns].clone(), nxt.bias.data.clone()
    model.features[3], model.head[0] = slim_conv, slim_next
    models.save_model(model, spec, tmp_path / "slim.pt")

    payload = torch.load(tmp_path / "slim.pt", weights_only=True)
    # groups: grouped convolutions' counts; metadata: the state dict's module versions
    assert set(payload) == {"format", "spec", "state", "groups", "metadata"}
    assert all(isinstance(v, torch.Tensor) for v in payload["state"].values())
    reloaded, _ = models.load_model(tmp_path / "slim.pt")
    x = torch.randn(4, 1, 28, 28)
    model.eval(), reloaded.eval()
    assert reloaded.features[3].out_channels == 7
    torch.testing.assert_close(reloaded(x), model(x))


FACTORY = '''\
from pathlib import Path

from torch import nn

Path(__file__).with_name("imported.flag").write_text("yes")


def build(spec):
    """A trusted user model: the spec has in_channels, image_size, num_classes, width, ..."""
    size = spec["in_channels"] * spec["image_size"] ** 2
    return nn.Sequential(nn.Flatten(), nn.Linear(size, 32), nn.ReLU(), nn.Linear(32, spec["num_classes"]))
'''


def test_user_model_only_through_an_explicit_import_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tinynet.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config.safety, "_TRUSTED_IMPORTS", set())
    for module in [m for m in sys.modules if m.startswith("mymodels")]:
        monkeypatch.delitem(sys.modules, module)
    flag = package / "imported.flag"

    # a model file that names code is not enough to import it...
    spec = {"arch": "custom", "import_path": "mymodels.tinynet:build", "in_channels": 1, "image_size": 28}
    torch.save({"format": "compress.model/1", "spec": {**spec, "num_classes": 10}, "state": {}}, "foreign.pt")
    with pytest.raises(
        ArtifactError, match="which no pipeline run here names in model.import_path; refusing"
    ):
        models.load_model(tmp_path / "foreign.pt")
    assert not flag.exists() and "mymodels.tinynet" not in sys.modules

    # ...a pipeline that names it is: the model trains, is saved as spec + state, and reloads
    text = _small(TINY_PIPELINE, train=2000).replace(
        "model: {arch: lenet5, width: 0.5}", 'model: {import_path: "mymodels.tinynet:build"}'
    )
    pipeline = write_pipeline(tmp_path, text, name="custom")
    code = main([str(pipeline), *OUT_ARGS, "--data-root", str(data_root), "-q"])
    assert code == 0, capsys.readouterr()
    assert flag.exists()
    model_file = tmp_path / "tmp" / "artifacts" / "custom" / "latest" / "stages" / "train" / "model.pt"
    payload = torch.load(model_file, weights_only=True)
    assert payload["spec"]["arch"] == "custom" and payload["spec"]["import_path"] == "mymodels.tinynet:build"
    model, _ = models.load_model(model_file)
    assert isinstance(model, torch.nn.Sequential) and model[1].out_features == 32
    manifest = json.loads((model_file.parents[3] / "latest" / "manifest.json").read_text())
    accuracy = manifest["variants"]["baseline"]["metrics"]["test_accuracy"]
    assert 0.5 < accuracy <= 1.0, accuracy  # a real model learned something in one epoch


def test_storage_credentials_reach_no_log_manifest_or_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A study storage URL with a password, given with --storage: after a full run (tune, its
    target, the HTML report) the password is in no file written and in no output."""
    secret = "hunter2-Zq9"
    url = f"sqlite:///{tmp_path / 'study.db'}?password={secret}"  # sqlite ignores it; masking must not
    text = _small(TINY_PIPELINE, train=500)
    text = text.replace("arch: lenet5, width: 0.5", "arch: lenet300, width: 0.25")
    tune = (
        "  - stage: tune\n    target: train\n    space: {optimizer.lr: {low: 0.01, high: 0.1, log: true}}\n"
        "    objectives: [maximize: val_accuracy]\n    n_trials: 1\n    sampler: random\n"
    )
    text = text.replace("stages:\n", "stages:\n" + tune) + "  - stage: report\n"
    pipeline = write_pipeline(tmp_path, text, name="secret")
    argv = [str(pipeline), *OUT_ARGS, "--data-root", str(data_root), "--storage", url]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["compress.run", *argv])  # what the manifest records
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert secret not in out + err
    written = [p for p in (tmp_path / "tmp").rglob("*") if p.is_file() and p.suffix != ".db"]
    kinds = {p.suffix for p in written}
    assert {".html", ".log", ".json", ".yaml"} <= kinds, kinds
    assert any(p.name == "run.log" for p in written) and any(p.name == "latest.html" for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    # the URL does reach these files, masked (so the test would see an unmasked one)
    for name in ("manifest.json", "latest.html", "run.log", "config.yaml"):
        text = next(p for p in written if p.name == name).read_text(encoding="utf-8")
        assert "password=***" in text, name


def test_train_init_starts_from_a_project_file_and_is_part_of_the_cache_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = {"arch": "lenet5", "width": 0.5, "in_channels": 1, "image_size": 28, "num_classes": 10}
    torch.manual_seed(123)
    start = models.build_model(spec)
    models.save_model(start, spec, tmp_path / "models" / "start.pt")
    text = _small(TINY_PIPELINE, train=300).replace("lr: 0.05", "lr: 1.0e-9")
    text = text.replace("schedule: onecycle", "schedule: constant\n    init: models/start.pt")
    pipeline = write_pipeline(tmp_path, text, name="init")
    argv = [str(pipeline), *OUT_ARGS, "--data-root", str(data_root), "-q"]
    assert main(argv) == 0, capsys.readouterr()
    trained = tmp_path / "tmp" / "artifacts" / "init" / "latest" / "stages" / "train" / "model.pt"
    model, _ = models.load_model(trained)
    for name, tensor in start.state_dict().items():  # lr 1e-9: the weights are still the init's
        torch.testing.assert_close(model.state_dict()[name], tensor, atol=1e-5, rtol=0)
    assert "train            ran" in capsys.readouterr().out

    assert main(argv) == 0
    assert "train            cached" in capsys.readouterr().out
    torch.manual_seed(7)  # other initial weights in the same file: the stage must run again
    models.save_model(models.build_model(spec), spec, tmp_path / "models" / "start.pt")
    assert main(argv) == 0
    assert "train            ran" in capsys.readouterr().out


def test_init_reads_a_file_wherever_it_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Weights kept in a models folder outside the project: an absolute path and ~/... are read
    (and checked: a file whose layers are not the model's is still refused, naming the path)."""
    project, home = tmp_path / "project", tmp_path / "home"
    (home / "models").mkdir(parents=True)
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(home))
    spec = {"arch": "lenet5", "width": 0.5, "in_channels": 1, "image_size": 28, "num_classes": 10}
    torch.save(models.build_model(spec).state_dict(), home / "models" / "lenet.pth")
    torch.save({"weight": torch.zeros(3)}, home / "models" / "other.pth")
    text = TINY_PIPELINE.replace("schedule: onecycle", "schedule: onecycle\n    init: INIT")
    for init in (str(home / "models" / "lenet.pth"), "~/models/lenet.pth"):
        pipeline = write_pipeline(project, text.replace("INIT", init), name="outside")
        assert main([str(pipeline), "--validate"]) == 0, capsys.readouterr().err
        assert "is valid" in capsys.readouterr().out
    pipeline = write_pipeline(project, text.replace("INIT", "~/models/other.pth"), name="outside")
    assert main([str(pipeline), "--validate"]) == 2
    assert "init: ~/models/other.pth does not fit lenet5" in capsys.readouterr().err
