"""Shared fixtures: the real MNIST data root, a CLI runner and a tiny trained baseline.

Tests run the public CLI in a subprocess with a temporary working directory, so what they
check is what a user gets: exit codes, messages, and the files written.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One intra-op thread in every test process and every CLI it starts: two xdist workers already
# fill the two cores, and OpenMP threads of four processes spin-waiting on two cores waste them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A test run started in the background (nohup, `cmd &` in a script) inherits SIGINT ignored,
# and so would every CLI it starts: the Ctrl-C tests would then see no Ctrl-C at all. A
# handled signal is reset to its default action in an exec'd child, an ignored one is not.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The modules that take minutes, longest first. With ``--no-loadscope-reorder`` (pyproject's
# addopts) xdist hands out modules in collection order, so these start at once on the two
# workers and the short ones fill in around them; by default it sends the modules with the
# most tests first, which left the pipeline walk and the CIFAR run to start together at the end.
LONGEST_FIRST = (
    "test_pipelines.py",
    "test_cifar.py",
    "test_targets.py",
    "test_qat.py",
    "test_torchvision.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# 2,000 training images, 1 epoch: seconds on a CPU, yet a real model (~89% accurate).
TINY_PIPELINE = """\
seed: 0
device: cpu
data:
  dataset: mnist
  val_size: 1000
  limit_train: 2000
  limit_test: 1000
stages:
  - stage: train
    model: {arch: lenet5, width: 0.5}
    epochs: 1
    batch_size: 32
    optimizer: {name: sgd, lr: 0.05}
    schedule: onecycle
"""


# A pruned copy of the tiny baseline, exported and timed briefly: a results table to gate and report.
BENCH = """\
  - stage: prune
    schedule: oneshot
    amount: 0.5
    finetune: null
  - stage: export
    formats: [onnx]
    parity_samples: 64
  - stage: benchmark
    runtimes: [pytorch, onnxruntime]
    batch_sizes: [1]
    warmup: 2
    repeats: 5
    min_seconds: 0.02
    max_seconds: 1
"""
# the quickest benchmark stage: eager PyTorch only, a few timed calls (tests read accuracies)
PYTORCH_BENCHMARK = """\
  - stage: benchmark
    runtimes: [pytorch]
    batch_sizes: [1]
    warmup: 2
    repeats: 5
    min_seconds: 0.02
    max_seconds: 1
"""


def _data_root() -> Path:
    configured = os.environ.get("COMPRESS_DATA_ROOT")
    root = Path(configured) if configured else REPO.parent / "shared" / "datasets"
    return root.resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST not found under {root}; set COMPRESS_DATA_ROOT to the datasets folder")
    return root


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private user cache (decompressed idx files, decoded images, file hashes, statistics),
    so a test neither sees nor fills the real one; yields compress's folder in it."""
    from compress import data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    data.clear_caches()
    yield tmp_path / "xdg-cache" / "compress"
    data.clear_caches()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def start_cli(
    *args: str | Path,
    cwd: Path,
    data_root: Path | None = None,
    module: str = "compress.run",
    env: dict[str, str] | None = None,
    subprocess_only: bool = False,
) -> subprocess.Popen | ForkedRun:
    """Start ``python -m <module> args...`` in ``cwd`` (see ``run_cli``) without waiting for it:
    two runs started together overlap their single-threaded seconds (ONNX export, imports)."""
    extra = {**(env or {}), **({"COMPRESS_DATA_ROOT": str(data_root)} if data_root is not None else {})}
    if _forkable(module, subprocess_only):
        server = _idle_server()
        if server is not None:
            return server.start(module, [str(a) for a in args], cwd, extra)
    full_env = {**os.environ, **extra}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_cli(proc: subprocess.Popen | ForkedRun, cwd: Path, timeout: float = 600) -> CliResult:
    if isinstance(proc, ForkedRun):
        return proc.finish(timeout)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return CliResult(proc.returncode, stdout, stderr, cwd)


def run_cli(
    *args: str | Path,
    cwd: Path,
    data_root: Path | None = None,
    module: str = "compress.run",
    timeout: float = 600,
    env: dict[str, str] | None = None,
    subprocess_only: bool = False,
) -> CliResult:
    """Run ``python -m <module> args...`` in ``cwd`` with the data root in the environment.

    Forked from a CLI server (``tests/cli_server.py``) unless the command is not in
    ``IN_PROCESS``, ``subprocess_only`` is set (a test of what a fresh interpreter does: imports,
    signals sent from outside), or COMPRESS_TEST_SUBPROCESS=1. Injected faults (COMPRESS_FAULT)
    fire in the forked child as in a subprocess: a kill or Ctrl-C ends that child alone."""
    proc = start_cli(
        *args, cwd=cwd, data_root=data_root, module=module, env=env, subprocess_only=subprocess_only
    )
    return finish_cli(proc, cwd, timeout)


# Commands run through ``tests/cli_server.py`` by default: a process that has imported torch,
# onnx, the ONNX exporter, pandas and optuna once forks a fresh child per run, which calls the
# command's ``main(argv)`` (all ``python -m`` adds is ``sys.exit``): the same parser, messages,
# files and exit codes as a subprocess, without paying 5-6 s of imports per run, and the child's
# memory and global state end with it. COMPRESS_TEST_SUBPROCESS=1 runs every command in a real
# subprocess.
IN_PROCESS = ("compress.run", "compress.check")
# Servers per test process: one per run in flight, as many as tests start at once (two).
MAX_SERVERS = 2


def _forkable(module: str, subprocess_only: bool) -> bool:
    return module in IN_PROCESS and not subprocess_only and os.environ.get("COMPRESS_TEST_SUBPROCESS") != "1"


class CliServer:
    """One ``tests/cli_server.py`` process: it runs one forked child at a time."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_server"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.busy = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def start(self, module: str, argv: list[str], cwd: Path, env: dict[str, str]) -> ForkedRun:
        """Send one run, with this process's environment as it is now; the answer is read later."""
        work = Path(tempfile.mkdtemp(prefix="cli-run-"))
        request = {"module": module, "argv": argv, "cwd": str(cwd)}
        request.update(out=str(work / "stdout"), err=str(work / "stderr"))
        request.update(env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        child = json.loads(self.process.stdout.readline())["pid"]
        return ForkedRun(self, child, [module, *argv], cwd, work)


@dataclass
class ForkedRun:
    """A run in flight on a CLI server; ``finish`` waits for its exit code and reads its output."""

    server: CliServer
    child: int
    command: list[str]
    cwd: Path
    work: Path

    def finish(self, timeout: float) -> CliResult:
        try:
            ready, _, _ = select.select([self.server.process.stdout], [], [], timeout)
            if not ready:  # the run outlived its time
                os.kill(self.child, signal.SIGKILL)
                self.server.process.stdout.readline()
                raise subprocess.TimeoutExpired(self.command, timeout)
            answer = json.loads(self.server.process.stdout.readline())
            out, err = self.work / "stdout", self.work / "stderr"
            stdout = out.read_text(errors="replace") if out.exists() else ""
            stderr = err.read_text(errors="replace") if err.exists() else ""
        finally:
            self.server.busy = False
            shutil.rmtree(self.work, ignore_errors=True)
        return CliResult(answer["code"], stdout, stderr, self.cwd)


_SERVERS: list[CliServer] = []  # this test process's CLI servers, started on first use
_SERVERS_LOCK = threading.Lock()  # tests start runs from threads too (tests/test_pipelines.py)


def _idle_server() -> CliServer | None:
    """An idle server, now marked busy, started if fewer than ``MAX_SERVERS`` run; None when all
    are busy (the run then takes a real subprocess)."""
    with _SERVERS_LOCK:
        _SERVERS[:] = [server for server in _SERVERS if server.alive()]
        idle = next((server for server in _SERVERS if not server.busy), None)
        if idle is None and len(_SERVERS) < MAX_SERVERS:
            idle = CliServer()
            _SERVERS.append(idle)
        if idle is not None:
            idle.busy = True
        return idle


def write_pipeline(directory: Path, text: str, name: str = "tiny") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class TinyRun:
    """A finished tiny run: its working directory, pipeline file and baseline model."""

    cwd: Path
    pipeline: Path
    run_dir: Path
    baseline: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> TinyRun:
    """One trained tiny baseline shared by every test that needs a model to compress."""
    cwd = tmp_path_factory.mktemp("tiny-run")
    pipeline = write_pipeline(cwd, TINY_PIPELINE)
    result = run_cli(pipeline, cwd=cwd, data_root=data_root)
    assert result.returncode == 0, result.output
    run_dir = (cwd / "artifacts" / "tiny" / "latest").resolve()
    baseline = (run_dir / "stages" / "train" / "model.pt").resolve()
    assert baseline.is_file()
    return TinyRun(cwd, pipeline, run_dir, baseline)
