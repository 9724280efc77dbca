"""compress: a staged model compression and deployment pipeline for PyTorch classifiers."""

import os

# OpenMP's default busy-waiting makes every process crawl as soon as two of them share the
# cores (measured here: a LeNet-300-100 training step went from 8 ms to 221 ms with a second
# pipeline running). Passive waiting costs next to nothing when the machine is idle. It must
# be set before torch loads its OpenMP runtime, hence here; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ``compress.run_pipeline`` and its types, loaded on first use: ``import compress`` stays cheap
# (no torch) for the CLI's ``check``/``verify`` and for a deploy bundle's verify child.
_API = ("run_pipeline", "RunResult", "Gates", "StageFailure")
_ERRORS = ("CompressError", "ConfigError", "DataError", "ArtifactError", "StorageError", "GateFailure")
__all__ = [*_API, *_ERRORS]


def __getattr__(name: str) -> object:
    if name in _API:
        from compress import api

        return getattr(api, name)
    if name in _ERRORS:
        from compress import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
