"""Stage ``tune``: a study that resumes after a kill with exactly ``n_trials``, never chooses an
infeasible trial, never reads the test split, hands its choice to the target stage, and is
shared by two worker processes through a real PostgreSQL server without leaking its password.

Trials tune a tiny LeNet-300 ``train`` stage (1,000 images, 1 epoch: about a second each), so the
whole study machinery runs for real in well under a minute per test.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import optuna
import pytest
import sqlalchemy

from compress.config import load_pipeline
from compress.errors import ConfigError
from compress.stages import REGISTRY, StageDef, config_registry
from compress.tuning import mask_secrets, with_storage
from compress.tuning.guard import TuningTestReadError
from compress.tuning.storage import driver_url
from tests.conftest import run_cli, write_pipeline
from tests.pg import PASSWORD, postgres_url  # noqa: F401  (a fixture)

BASE = """\
seed: 0
device: cpu
data: {dataset: mnist, val_size: 1000, limit_train: 1000, limit_test: 500}
stages:
  - stage: train
    model: {arch: lenet300, width: 0.5}
    epochs: 1
    batch_size: 64
    optimizer: {name: sgd, lr: 0.1}
"""
REFIT = """\
  - stage: train
    name: refit
    model: {arch: lenet300, width: 0.5}
    epochs: 1
    batch_size: 64
    optimizer: {name: sgd, lr: 0.1}
    output: refit
"""
# Fewer parameters is better, but an accuracy constraint against the baseline forbids the
# trials whose learning rate is too small to learn in the trials' 10 epochs. Trial 0 is the
# refit's own settings (enqueued), trials 1-3 are random.
TUNE = """\
  - stage: tune
    target: refit
    space:
      model.width: {choices: [0.25, 0.5]}
      optimizer.lr: {low: 0.000001, high: 0.3, log: true}
    trial_overrides: {epochs: 10}
    objectives: [minimize: parameters]
    constraint: {metric: val_accuracy, max_drop_pp: 3, against: baseline}
    sampler: random
    n_trials: 4
"""


N_SHARED = 5
# Tiny models train far faster on one thread than on threads fighting over busy cores (and two
# workers on one machine should split its cores anyway).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TUNE_FIRST = f"""\
  - stage: tune
    target: train
    space:
      optimizer.lr: {{low: 0.00001, high: 0.3, log: true}}
    objectives: [maximize: val_accuracy]
    n_trials: {N_SHARED}
    study_name: shared
"""


def _finished(trials: list[dict]) -> list[dict]:
    return [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]


# ---------------------------------------------------------------- resume, constraint, test split


@pytest.mark.slow
def test_killed_study_resumes_to_exactly_n_trials_and_never_picks_infeasible(tmp_path, data_root):
    pipeline = write_pipeline(tmp_path, BASE + TUNE + REFIT)
    env = {**os.environ, "COMPRESS_DATA_ROOT": str(data_root), "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen(
        [sys.executable, "-m", "compress.run", str(pipeline)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    killed = threading.Event()

    def watch() -> None:  # kill the run in trial 2's first epoch (of 10)
        assert proc.stderr is not None
        after_trial_1 = False
        for line in proc.stderr:
            seen.append(line)
            if "tune: trial 1:" in line:
                after_trial_1 = True
            elif after_trial_1 and "refit epoch 1/10" in line:
                proc.send_signal(signal.SIGKILL)
                killed.set()
                return

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    proc.wait(timeout=300)
    reader.join(timeout=10)
    assert killed.is_set(), "".join(seen)[-3000:]
    assert proc.returncode == -signal.SIGKILL

    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root, env=ONE_THREAD)
    assert result.returncode == 0, result.output
    assert "(3 trials so far)" in result.stderr  # trials 0, 1 and the killed trial 2
    assert "trial 2 was cut short by a killed run; retrying it" in result.stderr

    run_dir = (tmp_path / "artifacts" / "tiny" / "latest").resolve()
    study = json.loads((tmp_path / "reports" / "tiny" / "tune.study.json").read_text())
    trials = study["trials"]
    assert len(_finished(trials)) == 4 == study["n_trials"]
    assert [t["state"] for t in trials].count("FAIL") == 1
    retry = next(t for t in trials if t["retry_of"] is not None)
    assert retry["retry_of"] == 2 and retry["state"] == "COMPLETE"
    assert retry["params"] == trials[2]["params"]
    assert trials[0]["params"] == {"model.width": 0.5, "optimizer.lr": 0.1}  # the hand-set default

    # infeasible trials exist, are better on the objective, and are still not chosen
    chosen = study["chosen"]
    by_number = {t["number"]: t for t in trials}
    assert by_number[chosen["number"]]["feasible"] is True
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    unconstrained = min(complete, key=lambda t: (t["values"][0], t["number"]))
    assert unconstrained["feasible"] is False, trials  # what ignoring the constraint would pick
    assert chosen["number"] != unconstrained["number"]
    assert chosen["values"][0] == min(t["values"][0] for t in complete if t["feasible"])
    reference = study["constraint"]["reference"]
    for t in trials:
        if t["state"] == "COMPLETE":
            drop_pp = 100 * (reference - t["metrics"]["val_accuracy"])
            assert t["feasible"] is (drop_pp <= 3), t
    assert set(study["pareto_front"]) <= {t["number"] for t in trials if t["feasible"]}

    # trials never evaluated on the test split: no test metric, and the data module's counter
    assert all(t["metrics"]["test_accuracy"] is None for t in _finished(trials))
    assert study["test_reads_during_tuning"] == 0

    # the choice reached the target: its config, cache key and metrics hold the tuned values
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["refit"]["tuned_settings"] == chosen["params"]
    refit = manifest["variants"]["refit"]["metrics"]
    assert refit["parameters"] == chosen["metrics"]["parameters"]
    assert chosen["metrics"]["epochs"] == 10 and refit["epochs"] == 1  # trial budget vs its own
    assert isinstance(refit["test_accuracy"], float)  # the final run is not a trial
    assert stages["tune"]["metrics"]["chosen_trial"] == chosen["number"]
    assert stages["tune"]["metrics"]["trials_complete"] == 4
    csv = (tmp_path / "reports" / "tiny" / "tune.trials.csv").read_text().splitlines()
    assert len(csv) == 1 + len(trials) and "param.model.width" in csv[0]

    # a second run reuses everything, the tuned refit included
    again = run_cli(pipeline, cwd=tmp_path, data_root=data_root, env=ONE_THREAD)
    assert again.returncode == 0, again.output
    assert "(0 ran, 3 cached)" in again.stdout, again.stdout


def test_a_target_that_reads_the_test_split_during_a_trial_fails(tmp_path, data_root):
    """The trial's dataset raises on ``.test``: a stage that forgets ``ctx.tuning`` is caught."""
    from compress.config import StageConfig
    from compress.engine import RunOptions, StageFailed, run_pipeline
    from compress.variants import StageResult

    class PeekConfig(StageConfig):
        stage: str = "peek"
        tunable: ClassVar[bool] = True
        seed: int = 0

    def peek(cfg, inputs, ctx, out_dir):
        ctx.data().test  # noqa: B018 - the read is the point
        return StageResult()

    text = BASE.split("  - stage: train")[0] + (
        "  - stage: tune\n    target: peek\n    space: {seed: {low: 0, high: 1}}\n"
        "    objectives: [maximize: x]\n    n_trials: 1\n  - stage: peek\n"
    )
    REGISTRY["peek"] = StageDef("peek", PeekConfig, peek, 1, True)
    try:
        path = write_pipeline(tmp_path, text)
        pipeline = load_pipeline(path, config_registry())
        options = RunOptions(
            data_root=str(data_root), artifacts_dir=tmp_path / "artifacts", reports_dir=tmp_path / "reports"
        )
        with pytest.raises(StageFailed) as failure:
            run_pipeline(pipeline, options)
        assert failure.value.label == "tune"
        assert isinstance(failure.value.error, TuningTestReadError)
        assert "test split was read during a tuning trial" in str(failure.value.error)
    finally:
        REGISTRY.pop("peek", None)


def test_choice_is_the_stated_rule_on_the_feasible_pareto_front(tmp_path):
    """[maximize val_accuracy, minimize parameters] under a constraint on val_accuracy:
    smallest_within_tolerance picks the smallest feasible Pareto point, best the most accurate."""
    from compress.stages.tune import TuneConfig
    from compress.tuning.selection import choose

    def trial(number, acc, params, feasible):
        t = optuna.trial.create_trial(
            values=[acc, params],
            params={"amount": 0.5},
            distributions={"amount": optuna.distributions.FloatDistribution(0, 1)},
            user_attrs={"feasible": feasible},
        )
        t.number = number
        return t

    trials = [
        trial(0, 0.990, 1000, True),
        trial(1, 0.985, 400, True),
        trial(2, 0.970, 100, False),  # smallest of all, but beyond the tolerance
        trial(3, 0.984, 500, True),  # dominated by trial 1
        trial(4, 0.995, 2000, False),
    ]
    base = {
        "stage": "tune",
        "target": "prune",
        "space": {"amount": {"low": 0.5, "high": 0.9}},
        "objectives": [{"maximize": "val_accuracy"}, {"minimize": "parameters"}],
        "constraint": {"metric": "val_accuracy", "max_drop_pp": 1},
    }
    small = TuneConfig.model_validate(base)
    chosen, front = choose(trials, small)
    assert [t.number for t in front] == [0, 1] and chosen.number == 1
    assert "Pareto-optimal" in small.selection_rule() and "minimized parameters" in small.selection_rule()
    best = TuneConfig.model_validate({**base, "selection": "best"})
    assert choose(trials, best)[0].number == 0
    assert choose([trials[2], trials[4]], small) == (None, [])


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        (
            "    target: refit\n    space: {optimizer.lr: {low: 0.01, high: 20}}\n",
            "stages[1] (tune).space.optimizer.lr: 20.0 is not a valid setting of stage 'refit'",
        ),
        (
            "    target: refit\n    space: {optimiser.lr: {low: 0.01, high: 0.1}}\n",
            "unknown key (did you mean 'optimizer'?)",
        ),
        ("    target: refit\n    space: {epochs: {low: 0, high: 3}}\n", "space.epochs: 0 is not a valid"),
        ("    target: train\n    space: {epochs: {low: 1, high: 3}}\n", "must come after the tune stage"),
        ("    target: reft\n    space: {epochs: {low: 1, high: 3}}\n", "did you mean 'refit'?"),
        ("    target: refit\n    space: {epochs: {low: 3, high: 1}}\n", "low (3) must be less than high (1)"),
        (
            "    target: refit\n    space: {epochs: {low: 1, high: 3}}\n    trial_overrides: {epochs: -1}\n",
            "trial_overrides: epochs=-1",
        ),
        (
            "    target: refit\n    space: {epochs: {low: 1, high: 3}}\n"
            "    objectives: [maximize: val_accuracy, minimize: parameters]\n    pruner: median\n",
            "cannot prune multi-objective trials",
        ),
        (
            "    target: export\n    space: {opset: {low: 17, high: 18}}\n",
            "stage 'export' (export) has no tunable settings",
        ),
    ],
)
def test_bad_search_spaces_are_config_errors(tmp_path, tune, message):
    if "objectives:" not in tune:
        tune += "    objectives: [maximize: val_accuracy]\n"
    text = BASE + "  - stage: tune\n" + tune + REFIT + "  - stage: export\n"
    with pytest.raises(ConfigError) as error:
        load_pipeline(write_pipeline(tmp_path, text), config_registry())
    assert message in str(error.value)


# ---------------------------------------------------------------- credentials


def test_credentials_are_masked(tmp_path):
    url = "postgresql://tuner:hunter2@db.example:5432/studies?sslmode=require"
    assert mask_secrets(url) == "postgresql://tuner:***@db.example:5432/studies?sslmode=require"
    assert mask_secrets("mysql://u:p@h/d?password=x&a=1") == "mysql://u:***@h/d?password=***&a=1"
    assert mask_secrets("postgresql://tuner@db/studies") == "postgresql://tuner@db/studies"
    pipeline = load_pipeline(write_pipeline(tmp_path, BASE + TUNE + REFIT), config_registry())
    with_url = with_storage(pipeline, url, config_registry())
    tune = with_url.stages[1]
    assert tune.storage == url  # the real URL is used to connect...
    dumped = json.dumps(with_url.config.model_dump(mode="json", by_alias=True))
    assert "hunter2" not in dumped and "tuner:***@db.example" in dumped  # ...and masked when written


# ---------------------------------------------------------------- PostgreSQL, two workers


@contextlib.contextmanager
def _trials_table_held(url: str, waiters: int) -> Iterator[None]:
    """Keep every worker from counting or starting a trial until ``waiters`` of them wait for it.

    Trials here take a fraction of a second, so a worker that starts a few seconds late (a busy
    machine) could find the whole study done and the sharing would go unproven. Optuna's
    ``trials`` table is locked in one transaction; once ``waiters`` database sessions are
    blocked (each single-threaded worker can block only one at a time) the lock is released
    and the workers race for trials from the same start.
    """
    optuna.storages.RDBStorage(driver_url(url))  # the schema, as the first worker would make it
    engine = sqlalchemy.create_engine(driver_url(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as holder, engine.connect() as watcher:
            transaction = holder.begin()
            holder.execute(sqlalchemy.text("LOCK TABLE trials IN ACCESS EXCLUSIVE MODE"))
            yield
            blocked, deadline = 0, time.monotonic() + 240
            while blocked < waiters and time.monotonic() < deadline:
                time.sleep(0.2)
                query = "SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted"
                blocked = watcher.execute(sqlalchemy.text(query)).scalar_one()
                watcher.commit()
            transaction.commit()
            assert blocked >= waiters, f"only {blocked} worker(s) reached the study within 240 s"
    finally:
        engine.dispose()


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(tmp_path, data_root, postgres_url):  # noqa: F811
    # tune comes first and targets the train stage, so the workers need no cached input
    text = BASE.replace("  - stage: train\n", TUNE_FIRST + "  - stage: train\n")
    pipeline = write_pipeline(tmp_path, text)
    env = {**os.environ, "COMPRESS_DATA_ROOT": str(data_root), "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    command = [sys.executable, "-m", "compress.run", str(pipeline), "--only", "tune", "--worker"]
    with _trials_table_held(postgres_url, waiters=2):
        workers = [
            subprocess.Popen(
                [*command, "--storage", postgres_url],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, out + err

    # every trial number evaluated exactly once, by one worker or the other
    evaluated = [
        int(line.split("tune: trial ", 1)[1].split(":", 1)[0])
        for _, err in outputs
        for line in err.splitlines()
        if line.startswith("tune: trial ")
    ]
    assert sorted(evaluated) == list(range(N_SHARED)), evaluated
    assert all(any(line.startswith("tune: trial ") for line in err.splitlines()) for _, err in outputs)

    study = optuna.load_study(study_name="shared", storage=driver_url(postgres_url))
    states = [t.state for t in study.trials]
    assert len(study.trials) == N_SHARED == states.count(optuna.trial.TrialState.COMPLETE)

    # both workers ended on the same complete study, so chose the same trial
    runs = [p for p in (tmp_path / "artifacts" / "tiny").glob("*/manifest.json") if p.parent.name != "latest"]
    last_stages = [json.loads(p.read_text())["stages"][-1] for p in runs]
    chosen = [s["metrics"]["chosen_trial"] for s in last_stages if s["name"] == "tune"]
    assert len(chosen) == 2 and chosen[0] == chosen[1], chosen
    assert chosen[0] == max(study.trials, key=lambda t: (t.values[0], -t.number)).number

    # the password is in no log, manifest, config, report or output
    assert "tuner" not in postgres_url and PASSWORD in postgres_url
    for out, err in outputs:
        assert PASSWORD not in out + err
        assert ":***@" in err
    for root in (tmp_path / "artifacts", tmp_path / "reports"):
        for path in root.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".yaml", ".log", ".txt", ".csv"):
                assert PASSWORD not in path.read_text(errors="replace"), path


# ---------------------------------------------------------------- other targets: distill, quantize

DISTILL_AND_QUANTIZE = """\
  - stage: tune
    name: tune-kd
    target: distill
    space:
      temperature: {low: 1, high: 20}
      alpha: {low: 0.1, high: 0.9}
    objectives: [maximize: val_accuracy]
    sampler: random
    n_trials: 2
  - stage: distill
    student: {arch: lenet300, width: 0.25}
    epochs: 1
    batch_size: 64
    optimizer: {name: sgd, lr: 0.1}
  - stage: tune
    name: tune-q
    target: quantize
    space:
      calibration.method: {choices: [minmax, entropy]}
    variant: baseline.int8-static
    objectives: [maximize: val_accuracy]
    sampler: random
    n_trials: 2
  - stage: quantize
    modes: [static]
    calibration: {images: 128}
    tolerance: null
"""


@pytest.mark.slow
def test_distill_and_quantize_settings_are_tuned_on_validation_data_only(tmp_path, data_root):
    pipeline = write_pipeline(tmp_path, BASE + DISTILL_AND_QUANTIZE)
    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root, env=ONE_THREAD)
    assert result.returncode == 0, result.output
    reports = tmp_path / "reports" / "tiny"
    manifest = json.loads((tmp_path / "artifacts" / "tiny" / "latest" / "manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    for tune, target in (("tune-kd", "distill"), ("tune-q", "quantize")):
        study = json.loads((reports / f"{tune}.study.json").read_text())
        assert study["test_reads_during_tuning"] == 0
        finished = _finished(study["trials"])
        assert len(finished) == 2
        assert all(t["metrics"]["test_accuracy"] is None for t in finished)
        assert all(0.0 < t["metrics"]["val_accuracy"] <= 1.0 for t in finished)
        assert stages[target]["tuned_settings"] == study["chosen"]["params"]
    # a distillation trial trains the student alone; the final run adds its from-scratch control
    kd = json.loads((reports / "tune-kd.study.json").read_text())
    final = json.loads((reports / "distill.json").read_text())
    assert final["temperature"] == kd["chosen"]["params"]["temperature"]
    assert [r["kind"] for r in final["runs"]] == ["distilled", "scratch"]
    assert all(t["metrics"]["test_accuracy_mean"] is None for t in _finished(kd["trials"]))
    # same settings and budget as the chosen trial: the final student reproduces its validation score
    assert manifest["variants"]["student"]["metrics"]["val_accuracy"] == kd["chosen"]["values"][0]
    assert isinstance(manifest["variants"]["student"]["metrics"]["test_accuracy"], float)
    quantized = manifest["variants"]["baseline.int8-static"]["metrics"]
    assert isinstance(quantized["test_accuracy"], float) and quantized["delta_test_pp"] is not None


# ---------------------------------------------------------------- confirmation at full budget

CONFIRMED = """\
  - stage: tune
    target: refit
    space:
      model.width: {choices: [0.25, 0.5]}
      optimizer.lr: {low: 0.01, high: 0.3, log: true}
    trial_overrides: {epochs: 10}
    objectives: [minimize: parameters]
    constraint: {metric: val_accuracy, max_drop_pp: 0.0, trial_slack_pp: 5.0, against: baseline}
    confirm: 3
    sampler: random
    n_trials: 3
"""


def test_candidates_are_confirmed_at_full_budget_before_one_is_chosen(tmp_path, data_root):
    """Trials (10 epochs, 5 pp of slack) admit settings the full 1-epoch budget may not hold up;
    the chosen one is the first candidate that meets the strict tolerance (0 pp) when re-run."""
    pipeline = write_pipeline(tmp_path, BASE + CONFIRMED + REFIT)
    result = run_cli(pipeline, cwd=tmp_path, data_root=data_root, env=ONE_THREAD)
    assert result.returncode == 0, result.output
    study = json.loads((tmp_path / "reports" / "tiny" / "tune.study.json").read_text())
    reference = study["constraint"]["reference"]
    runs = study["confirmation"]["runs"]
    trials = {t["number"]: t for t in study["trials"]}
    assert 1 <= len(runs) <= 3
    assert all(trials[r["number"]]["feasible"] for r in runs)  # only feasible trials are candidates
    params = [trials[r["number"]]["metrics"]["parameters"] for r in runs]
    assert params == sorted(params)  # in the order the objective prefers
    for r in runs:
        assert r["metrics"]["epochs"] == 1  # the full budget, not the trial's 10 epochs
        assert r["metrics"]["test_accuracy"] is None  # still validation data only
        assert r["drop"] == pytest.approx(100 * (reference - r["metrics"]["val_accuracy"]))
        assert r["meets"] is (r["drop"] <= 0.0)
    assert all(not r["meets"] for r in runs[:-1])  # stops at the first that meets
    for k, r in enumerate(runs[1:], 1):  # after misses, only candidates with smaller trial drops
        assert r["trial_drop"] < min(m["trial_drop"] for m in runs[:k])
    # trial 0 is the refit's own settings, identical to the baseline's: it must meet 0 pp
    default = next((r for r in runs if r["number"] == 0), None)
    assert default is None or (default["drop"] == 0.0 and default["meets"])
    manifest = json.loads((tmp_path / "artifacts" / "tiny" / "latest" / "manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    if runs[-1]["meets"]:
        chosen = study["chosen"]
        assert chosen["number"] == runs[-1]["number"]
        assert stages["refit"]["tuned_settings"] == chosen["params"]
        # the final run repeats the confirmation run: same settings, budget and seed
        assert manifest["variants"]["refit"]["metrics"]["val_accuracy"] == runs[-1]["metrics"]["val_accuracy"]
        # ... and does not train again: the confirmation ran in refit's own work directory,
        # and refit resumed from its last checkpoint (epoch 1 of 1) there
        log = (tmp_path / "artifacts" / "tiny" / "latest" / "run.log").read_text()
        assert "refit resumes from this run's training instead of repeating it" in log
        assert "refit: resuming from" in log and "after epoch 1\n" in log
        assert "refit epoch 1/1" not in log.split("stage refit: running")[1]
        assert not any((tmp_path / "artifacts" / "tiny" / "cache" / ".partial").iterdir())  # all committed
    else:
        assert study["chosen"] is None and not stages["refit"].get("tuned_settings")
        assert "met the constraint at full budget" in result.stderr


def test_confirmation_runs_skip_candidates_no_more_promising_than_a_miss(tmp_path):
    """After the best candidate misses at full budget, its near neighbours (short-trial drops as
    large) are not worth a full run: the next run goes to a candidate with a smaller drop."""
    import logging
    from types import SimpleNamespace

    from compress.stages.tune import TuneConfig
    from compress.tuning.confirm import confirm as _confirm
    from compress.variants import StageResult, Variant

    cfg = TuneConfig(
        stage="tune",
        target="prune",
        space={"amount": {"low": 0.8, "high": 0.99}},
        objectives=[{"maximize": "sparsity"}],
        constraint={"metric": "val_accuracy", "max_drop_pp": 0.1, "trial_slack_pp": 0.2},
        confirm=2,
    )
    # (sparsity, short-trial drop pp, full-budget val accuracy against a 0.99 reference)
    trials = [(0.97, 0.22, 0.9885), (0.968, 0.24, 0.9899), (0.96, 0.22, 0.9899), (0.94, 0.12, 0.9895)]
    study = optuna.create_study(direction="maximize")
    for sparsity, drop, _ in trials:
        study.add_trial(
            optuna.trial.create_trial(
                params={"amount": sparsity},
                distributions={"amount": optuna.distributions.FloatDistribution(0.8, 0.99)},
                values=[sparsity],
                user_attrs={"drop": drop, "feasible": True},
            )
        )
    full_budget = {sparsity: val for sparsity, _, val in trials}
    ran: list[float] = []

    def run_stage(target, params, out_dir, on_epoch=None):
        ran.append(params["amount"])
        metrics = {"sparsity": params["amount"], "val_accuracy": full_budget[params["amount"]]}
        return StageResult(variants=[Variant("pruned", "torch", out_dir / "model.pt", metrics=metrics)])

    ctx = SimpleNamespace(run_stage=run_stage, stage_workdir=None, log=logging.getLogger("test"))
    summary: dict = {}
    _confirm(study, summary, cfg, ctx, tmp_path, reference=0.99)
    assert ran == [0.97, 0.94]  # 0.968 and 0.96 (drops 0.24, 0.22 >= 0.22) would have met, untried
    confirmation = summary["confirmation"]
    assert [r["meets"] for r in confirmation["runs"]] == [False, True]
    assert [s["number"] for s in confirmation["skipped"]] == [1, 2]
    assert summary["chosen"]["number"] == 3 and summary["chosen"]["params"] == {"amount": 0.94}
    assert summary["chosen"]["confirmed_drop"] == pytest.approx(0.05)


def test_slack_without_confirmation_is_a_config_error(tmp_path):
    text = BASE + CONFIRMED.replace("    confirm: 3\n", "") + REFIT
    with pytest.raises(ConfigError) as error:
        load_pipeline(write_pipeline(tmp_path, text), config_registry())
    assert "set confirm: N" in str(error.value)


def test_a_drop_of_exactly_the_tolerance_meets_it():
    """99.22% -> 99.12% is 0.1 pp (0.10000000000000009 in floating point): it meets 0.1 pp in
    tune's constraint, and in the gates and quantize's tolerance alike (one rule, ``measure.rules``)."""
    from compress.gating.numbers import accuracy_drop_pp, passes
    from compress.measure import within_tolerance
    from compress.tuning.constraint import ConstraintConfig, drop_pp

    constraint = ConstraintConfig(max_drop_pp=0.1)
    assert (0.9922 - 0.9912) * 100 > 0.1  # the float noise this guards against
    assert drop_pp(0.9922, 0.9912, constraint) == 0.1
    assert constraint.excess(drop_pp(0.9922, 0.9912, constraint)) == 0
    assert drop_pp(0.9922, 0.9911, constraint) > 0.1
    assert constraint.excess(drop_pp(0.9922, 0.9911, constraint)) > 0
    relative = ConstraintConfig(max_drop_pp=1.0, relative=True)
    assert drop_pp(0.5, 0.495, relative) == 1.0
    assert drop_pp(0.0, 0.1, relative) == math.inf
    gate_drop = accuracy_drop_pp({"accuracy": 0.9912}, {"accuracy": 0.9922})
    assert gate_drop == 0.1 and passes(gate_drop, "<=", 0.1)
    assert not passes(accuracy_drop_pp({"accuracy": 0.9911}, {"accuracy": 0.9922}), "<=", 0.1)
    assert within_tolerance(0.9922, 0.9912, 0.1) and not within_tolerance(0.9922, 0.9911, 0.1)
    assert within_tolerance(0.9922, 0.5, None)
