"""Rules that keep a pipeline file from reaching outside what it should.

A pipeline may come from someone else: names become file names (so they are restricted),
passwords in storage URLs are masked in every message, model factories are imported only
when a pipeline the user runs names them, and the files it names are read as tensors only
(``weights_only``), wherever they live.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SAFE_NAME_TEXT = "may hold only letters, digits, '.', '_' and '-' (it becomes a file name)"
IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")

_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
_QUERY_PASSWORD = re.compile(r"(?i)(?P<key>[?&;](?:password|passwd|pwd)=)(?P<pw>[^&\s]*)")


def safe_name(value: str | None) -> str | None:
    """``value`` unchanged if it can be a file or directory name; ValueError naming the rule if not."""
    if value is not None and not SAFE_NAME.fullmatch(value):
        raise ValueError(f"{SAFE_NAME_TEXT}, got {value!r}")
    return value


def mask_secrets(text: str) -> str:
    """``postgresql://me:secret@host/db`` -> ``postgresql://me:***@host/db`` (also ``?password=``)."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['key']}***", text)


# ``model.import_path`` values named by a pipeline validated in this process. Model files
# record their import path so they can be rebuilt, but a file alone never makes us import
# code: ``models.build_model`` imports only what a pipeline the user runs names (trusted code).
_TRUSTED_IMPORTS: set[str] = set()


def import_factory(path: str, trust: bool = False):  # noqa: ANN201 - returns the user's callable
    """The callable ``package.module:factory`` names; ``trust`` records it as named by a pipeline.

    Raises ValueError (with what to do) when the text is malformed or the import fails, and
    PermissionError when the path was never named by a validated pipeline.
    """
    if not IMPORT_PATH.fullmatch(path):
        raise ValueError(f"{path!r} is not 'package.module:factory' (e.g. 'mymodels.nets:build')")
    if not trust and path not in _TRUSTED_IMPORTS:
        raise PermissionError(path)
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error it raises is theirs to fix
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"cannot import {module_name!r} ({type(exc).__name__}: {first}); the module must be "
            "importable from the working directory or an installed package"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")
    if trust:
        _TRUSTED_IMPORTS.add(path)
    return factory


def input_file(text: str, key: str) -> Path:
    """The file a pipeline names for reading (``init``, ``model.weights``): wherever it lives.

    An absolute path, ``~/...``, or a path relative to the directory you run from. Reading is
    where the safety lies (``weights_only=True``, tensors only, no pickled code), and writing
    stays under the artifacts and reports folders; refusing paths outside the project turned
    away the commonest case, weights kept in a models folder. Raises ValueError naming ``key``.
    """
    if not text.strip():
        raise ValueError(f"{key}: is empty; give a file path (absolute, ~/..., or relative to where you run)")
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path.cwd() / path
