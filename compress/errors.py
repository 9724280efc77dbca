"""The errors a user can act on.

Every error raised for bad input carries a message that already names the file, the key
and the fix, so the CLI can print it as one line and exit without a traceback.
"""

from __future__ import annotations


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
