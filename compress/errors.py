"""The errors a user can act on.

Every error raised for bad input carries a message that already names the file, the key
and the fix, so the CLI can print it as one line and exit without a traceback.
"""

from __future__ import annotations

import errno


class CompressError(Exception):
    """Base of all errors that are the user's input, not our bug; exit code 2."""

    exit_code = 2


class ConfigError(CompressError):
    """The pipeline YAML or a command-line override is invalid."""


class DataError(CompressError):
    """A dataset could not be found, read or verified."""


class ArtifactError(CompressError):
    """A checkpoint, model file or stage input is missing, corrupt or not what it claims."""


class GateFailure(CompressError):
    """One or more quality gates failed; exit code 1 so CI can tell it from bad input."""

    exit_code = 1


class StorageError(ArtifactError):
    """A file could not be written: the disk is full or a directory is not writable."""

    # errno values that mean "this place cannot take the file", not "our code is wrong"
    ERRNOS = frozenset(
        {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
    )

    @classmethod
    def from_os_error(cls, exc: OSError, where: object = None) -> StorageError | None:
        """The one-line error for ``exc`` if it is a storage problem, else None."""
        if exc.errno not in cls.ERRNOS:
            return None
        name = exc.filename or (f"a file in {where}" if where is not None else "a file")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            hint = "free some disk space (or use --artifacts/--reports on another disk)"
        elif exc.errno == errno.ENOTDIR:
            hint = "a file stands where a directory is expected; move it away"
        else:
            hint = "make it writable (or use --artifacts/--reports elsewhere)"
        return cls(
            f"cannot write {name}: {exc.strerror}; {hint}. Finished stages are kept: "
            "run the same command again to continue"
        )
