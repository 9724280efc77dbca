"""A throwaway PostgreSQL cluster for the tests: initdb in a temp dir, a loopback port,
password authentication, stopped and deleted at the end.

``COMPRESS_TEST_PG_URL`` (a running server's URL) skips the start-up and is used as is. When
PostgreSQL cannot be started the fixture fails under CI (``CI`` set) and skips elsewhere.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

USER, PASSWORD, DATABASE = "compress", "s3cret-Pw_42", "studies"


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster and yield ``postgresql://USER:PASSWORD@127.0.0.1:PORT/DATABASE``."""
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install -y postgresql)")
    root = Path(tempfile.mkdtemp(prefix="compress-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    os.chmod(root, 0o700)
    data, log = root / "data", root / "server.log"
    port = _free_port()

    def run(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, timeout=120, **kw)

    try:
        pwfile = root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if prefix:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "-E",
            "UTF8",
        )
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        if log.exists():
            detail += log.read_text(errors="replace")[-2000:]
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"cannot start PostgreSQL: {exc}\n{detail}") from None
    try:
        psql = [str(bindir / "psql"), "-h", str(root), "-p", str(port), "-U", "postgres"]
        psql += ["-v", "ON_ERROR_STOP=1"]
        run(*psql, "-c", f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        run(*psql, "-c", f"CREATE DATABASE {DATABASE} OWNER {USER}")
        yield f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    given = os.environ.get("COMPRESS_TEST_PG_URL")
    if given:
        yield given
        return
    try:
        cluster = postgres_cluster()
        url = cluster.__enter__()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL here: {exc}")
    try:
        deadline = time.monotonic() + 30
        while True:  # the server accepts TCP connections a moment after pg_ctl returns
            try:
                socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        cluster.__exit__(None, None, None)
