"""Faults: kill -9 at every stage, Ctrl-C, two runs at once, edited cache entries, a full disk
and unwritable directories. After each, the same command completes, reuses what was finished
and resumes training from its last checkpoint.

Faults hit named points deterministically through the ``COMPRESS_FAULT`` test hook
(``compress/faults.py``). One pipeline (train -> prune -> quantize -> export -> report) is run
again and again with the same command, each time stopped at the next point, so every run both
proves that the previous stop cost nothing but the interrupted stage's work since its last
checkpoint and sets up the next stop. Killing the train stage by watching for its checkpoint,
and a tuning study killed inside a trial, are tested in test_training.py and test_tune.py.
Faults that end a run with a message (disk full, unwritable directories, damaged entries)
call the CLI's ``main`` in-process on a small train -> prune pipeline, which costs far less
than a subprocess per case.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from compress import data, engine, faults, run
from compress.config import load_pipeline
from compress.context import Context
from compress.errors import StorageError
from compress.stages import config_registry, load_stages
from tests.conftest import CliResult, run_cli, write_pipeline

ONE_THREAD = {"OMP_NUM_THREADS": "1"}

WALK = """\
seed: 0
device: cpu
data: {dataset: mnist, val_size: 500, limit_train: 1000, limit_test: 500}
stages:
  - stage: train
    model: {arch: lenet5, width: 0.5}
    epochs: 2
    batch_size: 32
    optimizer: {name: sgd, lr: 0.05}
    schedule: onecycle
  - stage: prune
    method: magnitude
    amount: 0.5
    steps: 2
    finetune: {epochs: 2, batch_size: 32, optimizer: {name: sgd, lr: 0.01}}
  - stage: quantize
    from: [baseline]
    modes: [static]
    calibration: {images: 128, batch_size: 32}
    tolerance: null
    latency: {rounds: 2, runs: 1, batch_size: 8}
  - stage: export
    from: [baseline, baseline.int8-static]
    formats: [onnx]
    parity_samples: 100
  - stage: report
"""

# (step, COMPRESS_FAULT, expected exit code), in the order the walk runs them.
WALK_FAULTS = [
    # Ctrl-C (SIGINT) in training while epoch 1's checkpoint is being written
    ("train-ctrl-c", "write:*/train-*/work/checkpoint.pt@int", 130),
    # kill -9 while prune's epoch-2 checkpoint is being written: a temp file, not renamed
    ("prune-mid-write", "write:*/prune-*/work/finetune/checkpoint.pt#2", -signal.SIGKILL),
    ("calibration", "calibrate:batch2", -signal.SIGKILL),
    ("export", "export:baseline.onnx", -signal.SIGKILL),
    ("report", "report:writing", -signal.SIGKILL),
    ("final", "", 0),
]


@dataclass
class Step:
    name: str
    fault: str
    result: CliResult
    run_dir: Path
    facts: dict = field(default_factory=dict)  # what the step left on disk, read before the next step

    @property
    def manifest(self) -> dict:
        path = self.run_dir / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {"stages": []}

    def status(self) -> dict[str, str]:
        return {s["name"]: s["status"] for s in self.manifest["stages"]}

    def lines(self, text: str) -> list[str]:
        return [line for line in self.result.stderr.splitlines() if text in line]


@dataclass
class Walk:
    cwd: Path
    steps: dict[str, Step]

    @property
    def cache(self) -> Path:
        return self.cwd / "artifacts" / "walk" / "cache"


def _run_dirs(base: Path) -> set[Path]:
    return {p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and p.name != "cache"}


def _only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def _epoch(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])


def _facts(name: str, cwd: Path) -> dict:
    """What a stopped run left behind, read before the next run changes it."""
    cache = cwd / "artifacts" / "walk" / "cache"
    partial = cache / ".partial"
    if name == "train-ctrl-c":
        work = _only(list(partial.glob("train-*/work")))
        return {"checkpoint_epoch": _epoch(work / "checkpoint.pt"), "temp_files": list(work.glob(".*.tmp"))}
    if name == "prune-mid-write":
        work = _only(list(partial.glob("prune-*/work/finetune")))
        return {
            "checkpoint_epoch": _epoch(work / "checkpoint.pt"),
            "temp_files": [p.name for p in work.glob(".checkpoint.pt.*.tmp")],
            "entries": [p.name for p in cache.glob("prune-*")],
        }
    if name == "export":
        return {"deploy": sorted(p.name for p in partial.glob("export-*/deploy/*.onnx"))}
    if name == "report":
        return {"published": sorted(p.name for p in (cwd / "reports" / "walk").iterdir())}
    return {}


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Walk:
    cwd = tmp_path_factory.mktemp("walk")
    pipeline = write_pipeline(cwd, WALK, name="walk")
    base = cwd / "artifacts" / "walk"
    steps: dict[str, Step] = {}
    for name, fault, code in WALK_FAULTS:
        before = _run_dirs(base) if base.is_dir() else set()
        tic = time.perf_counter()
        result = run_cli(pipeline, cwd=cwd, data_root=data_root, env={"COMPRESS_FAULT": fault, **ONE_THREAD})
        seconds = round(time.perf_counter() - tic, 1)
        assert result.returncode == code, f"step {name}: {result.output[-3000:]}"
        run_dir = _only(sorted(_run_dirs(base) - before))
        steps[name] = Step(name, fault, result, run_dir, {"seconds": seconds, **_facts(name, cwd)})
    return Walk(cwd, steps)


# ---------------------------------------------------------------- stopped at every stage


@pytest.mark.slow
def test_ctrl_c_in_training_stops_cleanly_and_the_rerun_resumes(walk: Walk) -> None:
    stopped, rerun = walk.steps["train-ctrl-c"], walk.steps["prune-mid-write"]
    err = stopped.result.stderr
    assert "Traceback" not in err, err
    assert f"run the same command again:\n  python -m compress.run {walk.cwd / 'walk.yaml'}\n" in err
    # the interrupted write was finished first: a whole checkpoint, no temp file
    assert stopped.facts["checkpoint_epoch"] == 1 and stopped.facts["temp_files"] == []
    resumed = rerun.lines("train: resuming from")
    assert resumed and "after epoch 1" in resumed[0]
    assert rerun.lines("train epoch 2/2") and not rerun.lines("train epoch 1/2")
    train = rerun.manifest["stages"][0]
    assert train["status"] == "ran" and train["metrics"]["resumed_from_epoch"] == 1
    history = json.loads((_only(list(walk.cache.glob("train-*"))) / "work" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]


@pytest.mark.slow
def test_kill_while_a_checkpoint_is_written_resumes_from_the_previous_one(walk: Walk) -> None:
    killed, rerun = walk.steps["prune-mid-write"], walk.steps["calibration"]
    # the kill left epoch 2's checkpoint as a temp file beside the whole epoch-1 checkpoint
    assert killed.facts["checkpoint_epoch"] == 1
    assert len(killed.facts["temp_files"]) == 1
    assert killed.facts["entries"] == []  # nothing half-done in the cache
    assert killed.status() == {"train": "ran"}
    # the rerun read only the whole file: it resumed after epoch 1 and trained epoch 2 alone
    resumed = rerun.lines("prune prune: resuming from")
    assert resumed and "after epoch 1" in resumed[0]
    assert rerun.lines("prune prune epoch 2/2") and not rerun.lines("prune prune epoch 1/2")
    assert rerun.status() == {"train": "cached", "prune": "ran"}
    assert not rerun.lines("train epoch")


@pytest.mark.slow
def test_kill_mid_calibration_reruns_only_quantize(walk: Walk) -> None:
    killed, rerun = walk.steps["calibration"], walk.steps["export"]
    assert "quantize" not in killed.status()
    assert rerun.status() == {"train": "cached", "prune": "cached", "quantize": "ran"}
    assert not rerun.lines("epoch")  # no training at all


@pytest.mark.slow
def test_kill_after_an_onnx_file_is_written_reruns_export(walk: Walk) -> None:
    killed, rerun = walk.steps["export"], walk.steps["report"]
    assert killed.facts["deploy"] == ["baseline.onnx"]  # one file written, the int8 one not yet
    assert "export" not in killed.status()
    assert rerun.status() == {"train": "cached", "prune": "cached", "quantize": "cached", "export": "ran"}
    export = rerun.manifest["stages"][3]["metrics"]
    assert (export["exported"], export["failed"]) == (2, 0)


@pytest.mark.slow
def test_kill_while_the_report_is_written_publishes_nothing_half_done(walk: Walk) -> None:
    killed, final = walk.steps["report"], walk.steps["final"]
    assert "report" not in killed.status()
    assert "latest.html" not in killed.facts["published"]  # published only once the stage is whole
    assert final.result.returncode == 0
    assert final.status() == {
        "train": "cached",
        "prune": "cached",
        "quantize": "cached",
        "export": "cached",
        "report": "ran",  # it reports on the run, so it never comes from the cache
    }
    assert "(1 ran, 4 cached)" in final.result.stdout
    reports = walk.cwd / "reports" / "walk"
    assert (reports / "latest.html").read_text().rstrip().endswith("</html>")
    assert (reports / f"{final.manifest['run_id']}.html").is_file()
    # no work directory is left behind: the killed report's (its key holds its run's id, so no
    # run resumes it) was removed by the next report stage
    assert list((walk.cache / ".partial").iterdir()) == []
    assert (
        "left by an interrupted earlier run"
        in (walk.cwd / "artifacts" / "walk" / "latest" / "run.log").read_text()
    )


# ---------------------------------------------------------------- in-process: main() of the CLI

TINY = """\
seed: 0
device: cpu
data: {dataset: mnist, val_size: 500, limit_train: 1000, limit_test: 500}
stages:
  - stage: train
    model: {arch: lenet5, width: 0.5}
    epochs: 2
    batch_size: 32
    optimizer: {name: sgd, lr: 0.05}
  - stage: prune
    amount: 0.5
    schedule: oneshot
    finetune: null
"""


@dataclass
class Cli:
    """``compress.run.main`` called in this process, in a working directory of its own."""

    cwd: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture

    def __call__(self, *args: str | Path, fault: str = "") -> tuple[int, str]:
        self.monkeypatch.chdir(self.cwd)
        self.monkeypatch.setenv("COMPRESS_FAULT", fault)
        self.monkeypatch.setattr(faults, "_hits", 0)
        self.capsys.readouterr()
        code = run.main(["tiny.yaml", *map(str, args)])
        captured = self.capsys.readouterr()
        return code, captured.out + captured.err

    def manifest(self) -> dict:
        return json.loads((self.cwd / "artifacts" / "tiny" / "latest" / "manifest.json").read_text())

    def status(self) -> dict[str, str]:
        return {s["name"]: s["status"] for s in self.manifest()["stages"]}


@pytest.fixture(scope="module")
def tiny_done(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A working directory where the tiny train -> prune pipeline has run once."""
    cwd = tmp_path_factory.mktemp("tiny-done")
    write_pipeline(cwd, TINY)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv("COMPRESS_DATA_ROOT", str(data_root))
        patch.setenv("COMPRESS_FAULT", "")
        assert run.main(["tiny.yaml", "--quiet"]) == 0
    return cwd


@pytest.fixture
def cli(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> Cli:
    monkeypatch.setenv("COMPRESS_DATA_ROOT", str(data_root))
    write_pipeline(tmp_path, TINY)
    return Cli(tmp_path, monkeypatch, capsys)


@pytest.fixture
def cli_done(tiny_done: Path, cli: Cli) -> Cli:
    """``cli`` in a copy of ``tiny_done``: train and prune are cached."""
    shutil.copytree(tiny_done / "artifacts", cli.cwd / "artifacts", symlinks=True)
    return cli


def _one_error_line(output: str) -> str:
    assert "Traceback" not in output and "Logging error" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def test_a_crash_between_result_and_rename_is_no_cache_hit_nor_a_stale_hash(
    cli: Cli, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine dies after writing the stage's result.json, before renaming it into the cache."""
    code, output = cli(fault="commit:prune-*@enospc")  # the state a kill -9 there leaves, in-process
    assert code == 2, output
    cache = cli.cwd / "artifacts" / "tiny" / "cache"
    assert [p.name for p in cache.glob(".partial/prune-*/result.json")] == ["result.json"]
    assert not list(cache.glob("prune-*"))  # so it is not a cache hit
    code, output = cli()
    assert code == 0, output
    assert cli.status() == {"train": "cached", "prune": "ran"}
    code, output = cli()  # the leftover result.json must not be hashed into the new entry
    assert code == 0, output
    assert cli.status() == {"train": "cached", "prune": "cached"}
    assert not [r for r in caplog.records if "was changed or removed" in r.getMessage()]


@pytest.mark.parametrize(
    ("damage", "name"),
    [("edited", "per_layer_sparsity.json"), ("truncated", "model.pt"), ("removed", "model.pt")],
)
def test_a_damaged_cached_file_is_detected_and_its_stage_reruns(
    cli_done: Cli, caplog: pytest.LogCaptureFixture, damage: str, name: str
) -> None:
    damaged = _only(list(cli_done.cwd.glob(f"artifacts/tiny/cache/prune-*/{name}")))
    if damage == "edited":  # one character: same size, other content
        damaged.write_text(damaged.read_text().replace("0.5", "0.6", 1))
    elif damage == "truncated":
        damaged.write_bytes(damaged.read_bytes()[:1000])
    else:
        damaged.unlink()
    code, output = cli_done()
    assert code == 0, output
    assert cli_done.status() == {"train": "cached", "prune": "ran"}
    warnings = [r.getMessage() for r in caplog.records if "was changed or removed" in r.getMessage()]
    assert len(warnings) == 1 and str(damaged.relative_to(cli_done.cwd)) in warnings[0], warnings
    assert damaged.is_file() and engine.cache.load_cached(damaged.parent, "prune") is not None  # whole again


def test_disk_full_while_a_stage_writes_exits_with_one_line_and_keeps_earlier_work(cli: Cli) -> None:
    code, output = cli(fault="write:*/prune-*/model.pt@enospc")
    assert code == 2
    line = _one_error_line(output)
    assert "cannot write artifacts/tiny/cache/.partial/prune-" in line and "/model.pt: " in line
    assert "No space left on device; free some disk space" in line
    train_entry = _only(list(cli.cwd.glob("artifacts/tiny/cache/train-*")))
    assert engine.cache.load_cached(train_entry, "train") is not None  # finished, whole, verified
    code, output = cli()
    assert code == 0, output
    assert cli.status() == {"train": "cached", "prune": "ran"}


def test_unwritable_artifacts_directory_is_one_line_naming_it(cli_done: Cli) -> None:
    cache = cli_done.cwd / "artifacts" / "tiny" / "cache"
    entries = sorted(p.name for p in cache.iterdir())
    as_root = os.geteuid() == 0
    if as_root:  # root writes through any mode bits: put a file where a directory must go
        shutil.rmtree(cache / ".partial")
        (cache / ".partial").write_text("not a directory\n")
        blocked = cache / ".partial"
    else:
        blocked = cli_done.cwd / "artifacts" / "tiny"
        blocked.chmod(0o500)
    try:
        code, output = cli_done()
    finally:
        if not as_root:
            blocked.chmod(0o700)
    assert code == 2
    line = _one_error_line(output)
    assert str(blocked.relative_to(cli_done.cwd)) in line
    assert sorted(p.name for p in cache.iterdir()) == entries  # earlier results untouched
    if as_root:
        blocked.unlink()
    code, output = cli_done()
    assert code == 0, output
    assert cli_done.status() == {"train": "cached", "prune": "cached"}


def test_unwritable_reports_directory_mid_run_is_one_line_naming_it(cli_done: Cli) -> None:
    (cli_done.cwd / "reports").write_text("a file where the reports directory should be\n")
    code, output = cli_done()  # train and prune are cached; prune's file is published again
    assert code == 2
    line = _one_error_line(output)
    assert line.startswith("error: cannot write reports/tiny: ")
    assert "Finished stages are kept: run the same command again" in line
    (cli_done.cwd / "reports").unlink()
    code, output = cli_done()
    assert code == 0, output
    assert cli_done.status() == {"train": "cached", "prune": "cached"}


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs, if this process may mount one (root with CAP_SYS_ADMIN); else skip."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        gc.collect()  # torch.save's writer, failed on the full disk, holds its file until collected
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_a_really_full_disk_is_one_line_and_keeps_earlier_work(cli: Cli, small_disk: Path) -> None:
    train_only = (cli.cwd / "tiny.yaml").read_text().split("  - stage: prune")[0]
    (cli.cwd / "train.yaml").write_text(train_only)
    cli.monkeypatch.chdir(cli.cwd)
    assert run.main(["train.yaml", "--artifacts", str(small_disk)]) == 0
    shutil.move(small_disk / "train", small_disk / "tiny")  # the same cache, under tiny's name
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 150_000))  # the pruned model needs ~440 kB

    code, output = cli("--artifacts", small_disk)  # torch.save fails half-way through model.pt
    assert code == 2
    line = _one_error_line(output)
    assert line.startswith(f"error: cannot write {small_disk}/tiny/cache/.partial/prune-")
    assert line.split(": ")[1].endswith("/model.pt") and "No space left on device; free some disk" in line

    gc.collect()  # the failed torch.save holds its (deleted) temp file's space until collected
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler2").write_bytes(b"\0" * (free - 4096))  # room for one small file
    code, output = cli("--artifacts", small_disk)
    assert code == 2
    assert "No space left on device" in _one_error_line(output)
    assert "warning: cannot write the run log " in output  # once, not a traceback per line

    for filler in small_disk.glob("filler*"):
        filler.unlink()
    code, output = cli("--artifacts", small_disk)
    assert code == 0, output
    manifest = json.loads((small_disk / "tiny" / "latest" / "manifest.json").read_text())
    assert {s["name"]: s["status"] for s in manifest["stages"]} == {"train": "cached", "prune": "ran"}


def test_storage_errors_name_the_file_and_the_fix() -> None:
    full = StorageError.from_os_error(OSError(errno.ENOSPC, "No space left on device", "a/b.pt"))
    assert str(full).startswith("cannot write a/b.pt: No space left on device; free some disk space")
    denied = StorageError.from_os_error(OSError(errno.EACCES, "Permission denied"), "a/work")
    assert str(denied).startswith("cannot write a file in a/work: Permission denied; make it writable")
    assert StorageError.from_os_error(OSError(errno.ENOENT, "No such file", "x")) is None  # not storage


# ---------------------------------------------------------------- two runs at once


def test_run_ids_are_unique_when_runs_start_in_the_same_second(tmp_path: Path) -> None:
    ids: list[str] = []
    threads = [
        threading.Thread(target=lambda: ids.append(engine.rundir.new_run_id(tmp_path))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8 == len(set(ids)) == len(list(tmp_path.iterdir()))


def _entry_lock(cwd: Path, pipeline: Path, data_root: Path) -> Path:
    """The lock file the engine takes for the pipeline's first (train) stage."""
    loaded = load_pipeline(pipeline, config_registry())
    prepared = data.prepare(loaded.config.data, data_root, "test")  # the key holds the data's fingerprint
    ctx = Context(loaded, "probe", cwd, torch.device("cpu"), data_root, "test", prepared=prepared)
    key = engine.cache.stage_key(load_stages()["train"], loaded.stages[0], [], ctx)
    return cwd / "artifacts" / loaded.name / "cache" / f".train-{key[:16]}.lock"


@pytest.mark.slow
def test_two_runs_at_once_share_the_cache_with_one_writer(tmp_path: Path, data_root: Path) -> None:
    pipeline = write_pipeline(tmp_path, TINY.split("  - stage: prune")[0])
    lock_path = _entry_lock(tmp_path, pipeline, data_root)
    lock_path.parent.mkdir(parents=True)
    env = {**os.environ, "COMPRESS_DATA_ROOT": str(data_root), "COMPRESS_FAULT": "", **ONE_THREAD}
    lock = FileLock(str(lock_path))
    lock.acquire()  # as if a third run were computing the stage: both must wait, saying so
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "compress.run", pipeline.name],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        waiting = [threading.Event(), threading.Event()]
        errs: list[list[str]] = [[], []]

        def read(i: int) -> None:
            for line in procs[i].stderr:
                errs[i].append(line)
                if "another process is computing this stage" in line:
                    waiting[i].set()

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
        for r in readers:
            r.start()
        for i in range(2):
            assert waiting[i].wait(120), "".join(errs[i])
    finally:
        lock.release()
    for p in procs:
        p.communicate(timeout=120)
    for r in readers:
        r.join(timeout=10)
    assert [p.returncode for p in procs] == [0, 0], errs
    base = tmp_path / "artifacts" / "tiny"
    manifests = [json.loads((d / "manifest.json").read_text()) for d in _run_dirs(base)]
    assert len(manifests) == 2 and len({m["run_id"] for m in manifests}) == 2
    assert sorted(m["stages"][0]["status"] for m in manifests) == ["cached", "ran"]
    assert len(list((tmp_path / "artifacts" / "tiny" / "cache").glob("train-*"))) == 1


def test_an_input_file_gone_missing_is_one_message_naming_it(tmp_path: Path) -> None:
    """A file an earlier stage attached to a variant and that is gone when the next stage keys
    its inputs: a message naming the variant, the file and the way out, not a FileNotFoundError."""
    from types import SimpleNamespace

    from compress.errors import ArtifactError
    from compress.variants import Variant

    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    gone = tmp_path / "deploy" / "student.model.json"
    variant = Variant("student", "torch", model, stage="distill")
    ctx = SimpleNamespace(artifacts={"student": {"onnx_json": gone}})
    with pytest.raises(ArtifactError) as error:
        engine.cache.variant_hashes(variant, ctx)
    message = str(error.value)
    assert "onnx_json file of variant 'student' is missing" in message and str(gone) in message
    assert "--from distill" in message
    gone.parent.mkdir()
    gone.write_text("{}")
    assert set(engine.cache.variant_hashes(variant, ctx)) == {"model", "onnx_json"}
