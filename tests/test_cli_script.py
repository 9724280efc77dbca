"""The ``compress`` console script: ``compress run|check|verify ...`` is ``python -m
compress.run|check|verify ...`` (same output, same exit code, same help); ``compress --help``
lists the commands and an unknown command is one line and exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import TINY_PIPELINE, finish_cli, run_cli, start_cli, write_pipeline

CORPUS = Path(__file__).parent / "bad_inputs"


def _installed_script() -> Path | None:
    """This interpreter's ``compress`` script (``pip install -e .`` makes it), else one on PATH."""
    here = Path(sysconfig.get_path("scripts")) / "compress"
    found = here if here.is_file() else shutil.which("compress")
    return Path(found) if found else None


def _start_compress(*args: str | Path, cwd: Path) -> subprocess.Popen:
    """``compress ARGS...`` by the installed script (by ``python -m compress.cli`` if there is
    none: the next test fails then, the others still check the dispatch)."""
    script = _installed_script()
    if script is None:
        return start_cli(*args, cwd=cwd, module="compress.cli")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [script, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_the_console_script_is_declared_and_installed() -> None:
    (entry,) = metadata.entry_points(group="console_scripts", name="compress")
    assert entry.value == "compress.cli:main"
    assert _installed_script() is not None, "run: python -m pip install --no-deps -e ."


@pytest.mark.parametrize("good", [True, False], ids=["valid", "unknown-key"])
def test_compress_run_validate_is_python_m_compress_run(tmp_path: Path, good: bool) -> None:
    path = write_pipeline(tmp_path, TINY_PIPELINE) if good else CORPUS / "misspelt_stage_key.yaml"
    # both at once: their seconds of importing torch overlap
    started = [
        start_cli(path, "--validate", cwd=tmp_path),
        _start_compress("run", path, "--validate", cwd=tmp_path),
    ]
    reference, result = (finish_cli(proc, tmp_path) for proc in started)
    assert reference.returncode == (0 if good else 2), reference.output
    assert ("is valid" in reference.stdout) if good else ("epoch: unknown key" in reference.stderr)
    assert (result.returncode, result.stdout, result.stderr) == (
        reference.returncode,
        reference.stdout,
        reference.stderr,
    )


@pytest.mark.parametrize("command", ["run", "check", "verify"])
def test_each_commands_help_is_its_modules_help(tmp_path: Path, command: str) -> None:
    via_cli = run_cli(command, "--help", cwd=tmp_path, module="compress.cli")
    direct = run_cli("--help", cwd=tmp_path, module=f"compress.{command}")
    assert via_cli.returncode == direct.returncode == 0
    assert via_cli.stdout == direct.stdout and f"python -m compress.{command}" in direct.stdout


def test_help_lists_the_commands_and_an_unknown_one_is_exit_2(tmp_path: Path) -> None:
    listed = finish_cli(_start_compress("--help", cwd=tmp_path), tmp_path)
    assert listed.returncode == 0, listed.output
    for command in ("run", "check", "verify"):
        assert f"\n  {command} " in listed.stdout
    unknown = finish_cli(_start_compress("runn", "x.yaml", cwd=tmp_path), tmp_path)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "unknown command 'runn'" in unknown.stderr
    assert "did you mean 'run'?" in unknown.stderr
    bare = run_cli(cwd=tmp_path, module="compress.cli")
    assert bare.returncode == 2 and "usage: compress" in bare.stderr
