"""Where a study lives and how several processes share it: the database URL (checked, masked,
given a driver), ``--storage`` for every tune stage, and the lock that keeps a shared study at
exactly ``n_trials``. No Optuna here, so the CLI and the engine can use it cheaply.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import re
import threading
from pathlib import Path
from typing import Any

from compress.config import StageConfig, mask_secrets

STORAGE_DIALECTS = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
_STORAGE_SCHEME = re.compile(r"(?P<dialect>[A-Za-z][A-Za-z0-9]*)(\+[A-Za-z0-9_]+)?")


def check_storage_url(url: str) -> str:
    """A study storage must be an SQLAlchemy URL of a database Optuna supports; ValueError if not.

    Checked when the pipeline is validated, so ``storage: mongodb://...`` fails before any
    run directory exists. The message never shows the password.
    """
    examples = "e.g. sqlite:///study.db, postgresql://user@host:5432/db or mysql://user@host/db"
    scheme, sep, _rest = url.partition("://")
    if not sep:
        raise ValueError(f"{mask_secrets(url)!r} is not a database URL; {examples}")
    match = _STORAGE_SCHEME.fullmatch(scheme)
    if match is None or match["dialect"].lower() not in STORAGE_DIALECTS:
        raise ValueError(
            f"unknown database scheme {scheme!r} in {mask_secrets(url)!r}; Optuna studies are stored in "
            f"{', '.join(STORAGE_DIALECTS)} databases ({examples})"
        )
    return url


def driver_url(url: str) -> str:
    """``postgresql://`` picks psycopg 3 in SQLAlchemy 2.1; use psycopg2 when only it is installed."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        if scheme == "postgres":
            return f"postgresql://{rest}"
    return url


def study_url(storage: str | None, out_dir: Path) -> tuple[str, str]:
    """The URL to open and the one to show: ``storage`` with its driver, or by default an
    SQLite file in the stage directory. The default database moves with that directory, so
    it is shown relative to it; any other URL is shown with its password masked."""
    url = driver_url(storage or f"sqlite:///{(out_dir / 'study.db').resolve()}")
    shown = "sqlite:///study.db (in the stage's directory)" if storage is None else mask_secrets(url)
    return url, shown


def with_storage(pipeline: Any, url: str, registry: dict[str, type[StageConfig]]) -> Any:
    """The pipeline with ``storage: url`` set on every tune stage (the ``--storage`` option)."""
    from compress.config import validate_pipeline
    from compress.errors import ConfigError

    try:
        check_storage_url(url)
    except ValueError as exc:
        raise ConfigError(f"--storage: {exc}") from None
    raw = copy.deepcopy(pipeline.raw)
    tunes = [
        s
        for s in raw.get("stages", [])
        if isinstance(s, dict) and getattr(registry.get(s.get("stage")), "supports_workers", False)
    ]
    if not tunes:
        raise ConfigError(f"--storage: {pipeline.path} has no tune or search stage to store a study for")
    for entry in tunes:
        entry["storage"] = url
    return validate_pipeline(raw, pipeline.path, registry)


# the statements that take and give back a database lock, by kind
_DATABASE_LOCKS = {
    "postgresql": ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"),
    "mysql": ("SELECT GET_LOCK(:n, -1)", "SELECT RELEASE_LOCK(:n)"),
}


class StudyLock:
    """Serialises "count the study's trials, then start one" across processes.

    Without it two workers can both see n_trials - 1 finished trials and both start one,
    ending at n_trials + 1. SQLite files use a lock file beside the database, PostgreSQL an
    advisory lock on a connection of its own, MySQL ``GET_LOCK``. ``release`` is idempotent,
    so a trial can release the lock as soon as Optuna has created it.
    """

    def __init__(self, url: str, study_name: str):
        self.kind = "thread"
        self.held = False
        self._conn = None
        thread = threading.Lock()
        self._take, self._give = thread.acquire, thread.release
        if url.startswith("sqlite"):
            path = _sqlite_path(url)
            if path is not None:
                from filelock import FileLock

                file = FileLock(str(path) + ".lock")
                self.kind, self._take, self._give = "file", file.acquire, file.release
        elif url.startswith(("postgresql", "postgres", "mysql", "mariadb")):
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect()
            self.kind = "postgresql" if url.startswith("postgres") else "mysql"
            if self.kind == "postgresql":
                digest = hashlib.sha256(f"compress.tune:{study_name}".encode()).digest()
                key = int.from_bytes(digest[:8], "big")
                params: dict[str, Any] = {"k": key - (1 << 64) if key >= 1 << 63 else key}  # a signed bigint
            else:
                params = {"n": f"compress.tune.{hashlib.sha256(study_name.encode()).hexdigest()[:40]}"}
            take, give = _DATABASE_LOCKS[self.kind]
            self._take = lambda: self._execute(take, params)
            self._give = lambda: self._execute(give, params)
        else:
            self.kind = "none"

    @property
    def cross_process(self) -> bool:
        return self.kind in ("file", "postgresql", "mysql")

    def acquire(self) -> None:
        self._take()
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._give()

    def _execute(self, statement: str, params: dict[str, Any]) -> None:
        import sqlalchemy

        self._conn.execute(sqlalchemy.text(statement), params)
        self._conn.commit()

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
            self._engine.dispose()
            self._conn = None

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL; None for in-memory databases."""
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)
