"""What the data *is*, as one hash: the stage cache keys on it, not on where the data lives.

A stage that reads data is reused only while the files it read are unchanged, so pointing a
pipeline at other files, or editing one image of a folder, re-runs what depends on the data
(DVC-style). Each file's content hash is memoised by (path, size, mtime, inode) in a small
SQLite table in the user cache, so an unchanged tree costs one ``stat`` per file, not a read.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from compress.data.root import cache_dir
from compress.fileio import sha256_file, sha256_json

log = logging.getLogger("compress")
MEMO = "file-hashes.sqlite"


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    real = path.resolve()
    info = real.stat()
    return str(real), info.st_size, info.st_mtime_ns, info.st_ino


class _Memo:
    """path -> sha256 for files whose size, mtime and inode have not changed since hashed."""

    def __init__(self, location: Path):
        self.rows: dict[str, tuple[int, int, int, str]] = {}
        self.new: list[tuple[str, int, int, int, str]] = []
        self.db: sqlite3.Connection | None = None
        try:
            location.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(location, timeout=30)
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                "inode INTEGER, sha256 TEXT)"
            )
            for path, size, mtime, inode, digest in self.db.execute("SELECT * FROM files"):
                self.rows[path] = (size, mtime, inode, digest)
        except (OSError, sqlite3.Error) as exc:  # a read-only cache: hash every time
            log.info("data: no file-hash memo at %s (%s); hashing file contents", location, exc)
            self.db = None

    def digest(self, path: Path) -> str:
        real, size, mtime, inode = _stat_key(path)
        known = self.rows.get(real)
        if known is not None and known[:3] == (size, mtime, inode):
            return known[3]
        digest = sha256_file(real)
        self.rows[real] = (size, mtime, inode, digest)
        self.new.append((real, size, mtime, inode, digest))
        return digest

    def save(self) -> None:
        if self.db is None or not self.new:
            return
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", self.new)
            self.new.clear()
        except sqlite3.Error as exc:
            log.info("data: cannot update the file-hash memo (%s)", exc)


@lru_cache(maxsize=8)
def _fingerprint(entries: tuple[tuple[str, str, int, int, int], ...], extra: str) -> str:
    """Memoised per process by the files' (name, real path, size, mtime, inode)."""
    memo = _Memo(cache_dir() / MEMO)
    try:
        digests = [(name, memo.digest(Path(real))) for name, real, *_ in entries]
    finally:
        memo.save()
    return sha256_json({"files": digests, "extra": extra})


def fingerprint(files: Iterable[tuple[str, Path]], extra: object = None) -> str:
    """One hash over (name, content hash) of every file; ``name`` is how the dataset refers to
    the file (a path relative to its dataset folder), so moving the data elsewhere keeps it."""
    entries = tuple(sorted((name, *_stat_key(Path(path))) for name, path in files))
    return _fingerprint(entries, hashlib.sha256(repr(extra).encode()).hexdigest())


def clear() -> None:
    _fingerprint.cache_clear()
