"""Stage ``search``: an Optuna study over whole recipes (distil, prune, quantize) whose trials
are scored in onnxruntime on validation data, which survives a failing trial and a kill, and
ships its picks only when they hold the accuracy constraint at full budget.

The CLI runs search a LeNet-300 at half width on 1,000 MNIST images (trials on 600 images, one
epoch), so a whole study with its rebuilds takes about half a minute.
"""

from __future__ import annotations

import json
import os
import re
import time
from html import escape

import optuna
import pytest
from filelock import FileLock

from compress.config import load_pipeline
from compress.errors import ConfigError
from compress.stages import config_registry
from compress.tuning import recipe
from compress.tuning.recipe import TechniqueConfig, TrialBudget
from compress.tuning.settings import step_config
from tests.browser import BrowserUnavailable, visit
from tests.conftest import finish_cli, run_cli, start_cli, write_pipeline

BASE = """\
seed: 0
device: cpu
data: {dataset: mnist, val_size: 500, limit_train: 1000, limit_test: 500}
stages:
  - stage: train
    model: {arch: lenet300, width: 0.5}
    epochs: 2
    batch_size: 64
    optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
"""
SEARCH = """\
  - stage: search
    techniques:
      distill: {settings: {epochs: 2, batch_size: 64, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}}}
      prune: {settings: {finetune: {epochs: 1, batch_size: 64}}, space: {amount: {low: 0.5, high: 0.9}}}
      quantize: {settings: {calibration: {images: 256}}}
    max_drop_pp: 2.0
    trial_slack_pp: 1.0
    trial_budget: {train_images: 600, epochs: 1}
    sampler: random
    n_trials: 5
"""
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- recipes (fast)


def test_a_trials_parameters_become_a_chain_of_stage_settings_in_technique_order():
    techniques = {
        "quantize": TechniqueConfig(),
        "prune": TechniqueConfig(settings={"finetune": {"epochs": 4}}),
        "distill": TechniqueConfig(settings={"student": {"arch": "lenet5"}}, space={"student.width": [0.25]}),
    }
    space = recipe.space_of(techniques)
    assert list(space) == [
        "distill",
        "distill.student.width",
        "prune",
        "prune.amount",
        "quantize",
        "quantize.mode",
    ]
    params = {
        "distill": True,
        "distill.student.width": 0.25,
        "prune": False,
        "prune.amount": 0.9,
        "quantize": True,
        "quantize.mode": "static",
    }
    steps = recipe.recipe(params, techniques)
    assert [(s.technique, s.kind) for s in steps] == [("distill", "distill"), ("quantize", "quantize")]
    assert steps[0].settings["student"] == {"arch": "lenet5", "width": 0.25}
    assert steps[0].settings["control"] is False and steps[0].settings["seeds"] == 1
    assert steps[1].settings["modes"] == ["static"] and "mode" not in steps[1].settings
    assert recipe.describe(steps) == "kd w0.25 > int8 static"
    assert recipe.describe([]) == "fp32 (no technique)"
    # every step's settings are a config its own stage accepts
    classes = config_registry()
    for step in steps:
        step_config(classes[step.kind], step.settings, ["baseline"])


def test_short_trials_cap_every_training_step_but_keep_the_techniques_own_settings():
    techniques = {
        "distill": TechniqueConfig(settings={"student": {"arch": "lenet5"}, "epochs": 6}),
        "prune": TechniqueConfig(
            settings={"finetune": {"epochs": 4, "optimizer": {"name": "sgd", "lr": 0.02}}}
        ),
    }
    params = {"distill": True, "distill.student.width": 0.5, "prune": True, "prune.amount": 0.8}
    steps = recipe.recipe(params, techniques)
    classes = config_registry()
    configs = [step_config(classes[s.kind], s.settings, ["baseline"]) for s in steps]
    short = recipe.short_budget(steps, TrialBudget(train_images=1000, epochs=2, full=[]), configs)
    assert short[0].settings["epochs"] == 2 and steps[0].settings["epochs"] == 6
    assert short[1].settings["finetune"] == {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.02}}
    assert steps[1].settings["finetune"]["epochs"] == 4
    assert all(step.short for step in short)
    # by default a student is distilled at full budget, once per setting, and shared
    default = recipe.short_budget(steps, TrialBudget(train_images=1000, epochs=2), configs)
    assert default[0] == steps[0] and not default[0].short
    assert default[1].short and default[1].settings["finetune"]["epochs"] == 2


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ("techniques: {sparsify: {}}", "techniques.sparsify"),
        (
            "techniques: {prune: {space: {amount: {low: 0.5, high: 1.5}}}}",
            "techniques.prune.space.amount: 1.5",
        ),
        ("techniques: {prune: {settings: {method: sideways}}}", "techniques.prune"),
        (
            "techniques: {quantize: {space: {mode: [dynamic, int4]}}}",
            "techniques.quantize.space.mode: 'int4'",
        ),
        ("techniques: [prune]\n    runtime: litert", "runtime: 'litert' converts the PyTorch model"),
        ("techniques: [prune]\n    runtime: tensorrt", "runtime: 'tensorrt' is not a runtime"),
        ("techniques: [prune]\n    minimize: [gzip_bytes, file_bytes]", "both name the smallest file"),
        ("techniques: [prune]\n    from: [nothing]", "nothing"),
    ],
)
def test_bad_search_configs_are_config_errors_naming_the_key(tmp_path, search, message):
    pipeline = write_pipeline(tmp_path, BASE + f"  - stage: search\n    {search}\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(pipeline, config_registry())
    assert message in str(err.value), str(err.value)
    assert "stages[1]" in str(err.value)


def test_a_worker_needs_a_storage_the_others_reach(tmp_path):
    """A --worker process cannot share the stage directory's own SQLite file: one message
    naming the stage and the two ways to give a shared storage."""
    search = load_pipeline(write_pipeline(tmp_path, BASE + SEARCH), config_registry()).stages[1]
    assert search.private_storage(worker=False) is True
    with pytest.raises(ConfigError, match=r"stage 'search': --worker needs a storage .*in the search stage"):
        search.private_storage(worker=True)
    shared = search.model_copy(update={"storage": "postgresql://user@host/db"})
    assert shared.private_storage(worker=True) is False


# ---------------------------------------------------------------- a study through the CLI (slow)


def _study(tmp_path) -> dict:
    return json.loads((tmp_path / "reports" / "tiny" / "search.study.json").read_text())


@pytest.mark.slow
def test_search_resumes_after_a_kill_survives_a_failed_trial_and_ships_only_what_holds_the_constraint(
    tmp_path, data_root
):
    pipeline = write_pipeline(tmp_path, BASE + SEARCH + "  - stage: benchmark\n  - stage: report\n")
    killed = run_cli(
        pipeline, cwd=tmp_path, data_root=data_root, env={"COMPRESS_FAULT": "search:trial2", **ONE_THREAD}
    )
    assert killed.returncode != 0
    # the first run queued five trials (one of each kind of chain, up to n_trials) and was killed
    # in trial 2; the resumed run retries it after the queued 3 and 4. Trial 4 fails writing a
    # file (a full disk): it is recorded with its reason and the study goes on to exactly n_trials
    fault = {"COMPRESS_FAULT": "write:*trials/00004/*@enospc", **ONE_THREAD}
    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root, env=fault)
    assert result.returncode == 0, result.output
    assert "(5 trials so far)" in result.stderr, result.stderr[-3000:]
    assert "trial 2 was cut short by a killed run; retrying it" in result.stderr
    study = _study(tmp_path)
    trials = study["trials"]
    retry = next(t for t in trials if t["retry_of"] is not None)
    assert retry["retry_of"] == 2 and retry["params"] == trials[2]["params"]
    failed = [t for t in trials if t["state"] == "FAIL"]
    assert [t["number"] for t in failed] == [2, 4], trials
    assert "No space left" in failed[1]["rejected"] or "ENOSPC" in failed[1]["rejected"], failed[1]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(complete) == 5 == study["n_trials"]

    # each trial is a chain scored as a file in onnxruntime, on validation data only
    reference = study["reference"]
    assert reference["runtime"] == "onnxruntime" and reference["batch_size"] == 64
    for t in complete:
        m = t["metrics"]
        assert m["runtime"] == "onnxruntime" and m["gzip_bytes"] < m["file_bytes"]
        assert t["values"] == [m["gzip_bytes"], m["latency_ms"]]
        assert isinstance(m["recipe"], str) and m["recipe"]
        drop = 100 * (reference["val_accuracy"] - m["val_accuracy"])
        assert t["feasible"] is (drop <= 2.0 + 1.0 + 1e-9), t
        if m["recipe"].endswith("int8 dynamic") or m["recipe"].endswith("int8 static"):
            assert m["file_bytes"] < 0.5 * reference["file_bytes"], t  # int8 weights: a quarter
    assert study["test_reads_during_tuning"] == 0
    assert study["objectives"] == [
        {"metric": "gzip_bytes", "direction": "minimize"},
        {"metric": "latency_ms", "direction": "minimize"},
    ]

    # what ships held the constraint at full budget, and is measured like every variant
    manifest = json.loads((tmp_path / "artifacts" / "tiny" / "latest" / "manifest.json").read_text())
    builds = {b["number"]: b for b in study["builds"]}
    shipped = [p for p in study["picks"] if p["trial"] is not None]
    assert shipped, study["picks"]
    for pick in study["picks"]:
        if pick["trial"] is None:
            assert f"search.{pick['purpose']}" not in manifest["variants"]
            continue
        build = builds[pick["trial"]]
        assert build["meets"] and build["drop"] <= 2.0, build
        # a recipe picked twice ships once, under the first objective's name
        first = next(p for p in study["picks"] if p["trial"] == pick["trial"])
        assert pick["shipped_as"] == f"search.{first['purpose']}"
        variant = manifest["variants"][pick["shipped_as"]]
        assert variant["parent"] == "baseline" and variant["metrics"]["recipe"] == build["recipe"]
        assert isinstance(variant["metrics"]["test_accuracy"], float)
    for number, build in builds.items():
        assert build["meets"] or number not in [p["trial"] for p in study["picks"]]
    results = json.loads((tmp_path / "reports" / "tiny" / "results.json").read_text())
    names = {row["variant"] for row in results}
    assert {p["shipped_as"] for p in shipped} <= names
    html = (tmp_path / "reports" / "tiny" / "latest.html").read_text()
    assert 'class="recipes"' in html and "Recipe search (search): accuracy vs size" in html
    for t in complete:
        assert f"<td>{escape(t['metrics']['recipe'])}</td>" in html
    # the study section as a reader sees it, in headless Chromium
    try:
        seen = visit(
            tmp_path / "reports" / "tiny" / "latest.html", tmp_path / "page.png", tmp_path / "profile"
        )
    except BrowserUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"headless Chromium is required in CI: {exc}")
        pytest.skip(str(exc))
    assert seen.console_errors == [] and seen.page_errors == []
    study_text = seen.sections["tuning"]["text"]
    assert seen.sections["tuning"]["height"] > 100
    assert all(t["metrics"]["recipe"] in study_text for t in complete)
    assert all(f"{p['purpose']}: trial {p['trial']} (" in study_text for p in shipped)
    charts = {i["alt"]: i for i in seen.images}
    for title in ("accuracy vs size (gzip bytes)", "accuracy vs latency (ms)"):
        image = charts[f"Recipe search (search): {title}"]
        assert image["complete"] and image["width"] > 0 and image["data_uri"], image


@pytest.mark.slow
def test_two_workers_share_one_search_study(tmp_path, data_root):
    pipeline = write_pipeline(tmp_path, BASE + SEARCH.replace("n_trials: 5", "n_trials: 6"))
    first = run_cli(pipeline, "--only", "train", cwd=tmp_path, data_root=data_root, env=ONE_THREAD)
    assert first.returncode == 0, first.output
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    args = (pipeline, "--only", "search", "--worker", "--storage", url)
    # the study's lock is held until both workers have scored the parent and are about to open
    # the study, so neither can run every trial before the other arrives
    with FileLock(str(tmp_path / "shared.db") + ".lock"):
        workers = [start_cli(*args, cwd=tmp_path, data_root=data_root, env=ONE_THREAD) for _ in range(2)]
        parents = tmp_path / "artifacts" / "tiny" / "cache" / ".partial"
        deadline = time.monotonic() + 300
        while (
            len(list(parents.glob("search-*.worker-*/parent/model.onnx"))) < 2 and time.monotonic() < deadline
        ):
            time.sleep(0.2)
    outputs = [finish_cli(w, tmp_path, timeout=600) for w in workers]
    for out in outputs:
        assert out.returncode == 0, out.output
    # one trial line per evaluated trial (a progress bar may share the line: search the text)
    evaluated = [int(n) for out in outputs for n in re.findall(r"search: trial (\d+): [^\n]*->", out.stderr)]
    assert sorted(evaluated) == list(range(6)), evaluated  # each trial once, by one or the other
    assert all("search: trial " in out.stderr for out in outputs)  # both did some
    names = optuna.get_all_study_names(url)
    study = optuna.load_study(study_name=names[0], storage=url)
    assert len(names) == 1 and [t.state.name for t in study.trials].count("COMPLETE") == 6


@pytest.mark.slow
def test_a_file_scores_alike_in_each_runtime_that_reads_onnx_int8_included(tmp_path, tiny_run, data_root):
    """``runtime:`` scores a trial's file where the user runs it, converted as the export stage
    converts it and run as the benchmark runs it: onnxruntime, ORT Mobile's format and OpenVINO
    agree on validation accuracy for an fp32 and an int8 file, and each is sized as it ships."""
    from compress.config import DataConfig
    from compress.data import load_data
    from compress.quantization.ort import OrtSettings, quantize_onnx_dynamic
    from compress.ship import score
    from compress.variants import Variant

    bundle = load_data(DataConfig(val_size=300, limit_train=600, limit_test=100), data_root)
    fp32 = Variant("baseline", "torch", tiny_run.baseline)
    exported = score.onnx_file(fp32, bundle, tmp_path / "exported")
    int8 = Variant("int8", "onnx", quantize_onnx_dynamic(exported, tmp_path / "int8.onnx", OrtSettings()))
    for variant in (fp32, int8):
        out = tmp_path / variant.name
        scores = {runtime: score.score(variant, bundle, out, 8, 1, runtime) for runtime in score.RUNTIMES}
        accuracies = {runtime: s["val_accuracy"] for runtime, s in scores.items()}
        assert max(accuracies.values()) - min(accuracies.values()) <= 1 / 300 + 1e-9, accuracies
        assert accuracies["onnxruntime"] > 0.5, accuracies
        assert all(s["runtime"] == r and s["latency_ms"] > 0 for r, s in scores.items()), scores
        ir = {p.name: p.stat().st_size for p in (out / "openvino").iterdir()}
        assert sorted(ir) == ["model.bin", "model.xml"]
        assert scores["openvino"]["file_bytes"] == sum(ir.values())
        assert scores["ort"]["file_bytes"] == (out / "ort" / "ort-out" / "model.ort").stat().st_size
    assert scores["onnxruntime"]["file_bytes"] < 0.5 * exported.stat().st_size  # the int8 file
