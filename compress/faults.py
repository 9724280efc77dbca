"""A test hook: make a run fail at a named point, so tests can stop it exactly where they mean to.

Code calls ``faults.checkpoint(name)`` where a crash matters. Normally that is one environment
lookup and nothing else. Tests set

    COMPRESS_FAULT=<pattern>[#<n>][@kill|@int|@enospc|@corrupt]

and the point whose name matches the glob ``pattern`` (``fnmatch``; ``*`` also matches ``/``)
for the n-th time in this process (default: the first) fires: ``kill`` (the default) sends
SIGKILL to this process (power cut, OOM killer), ``int`` sends it SIGINT (Ctrl-C) and
``enospc`` raises ``OSError(ENOSPC)`` naming the point's file (a full disk); ``corrupt`` makes
``checkpoint`` return True, and a point that checks it spoils its own result (a converted
file whose outputs drift). Tests run the
same command again with the variable unset (or naming the next point) to resume.

The points:

    write:<path>            an atomic write (fileio.atomic_path) has its temp file complete,
                            not yet renamed into place
    fit:<workdir>:epoch<N>  training.fit has epoch N's checkpoint in place
    calibrate:batch<N>      onnxruntime static calibration has been fed N batches
    export:<file>.onnx      the export stage has a variant's ONNX file in deploy/, more to do
    parity:<variant>:<target>  an edge target's parity was measured (@corrupt: its logits are
                            treated as shifted by 1.0, so the target fails parity)
    <stage>:trial<N>        trial N of a tune or search stage has started (its settings are drawn)
    report:writing          the report stage has written part of its files
    commit:<entry>          the engine has written a stage's result.json, not yet renamed the
                            stage's directory into the cache (<entry> = <stage>-<key prefix>)

Not a user feature: nothing but tests should set COMPRESS_FAULT.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from fnmatch import fnmatchcase
from pathlib import Path

ENV = "COMPRESS_FAULT"
_SPEC = re.compile(r"(?P<pattern>.+?)(?:#(?P<nth>\d+))?(?:@(?P<action>kill|int|enospc|corrupt))?")
_hits = 0  # matches so far in this process (one fault per process: the spec never changes)


def checkpoint(name: str, path: Path | str | None = None) -> bool:
    """Fire the fault named by $COMPRESS_FAULT if ``name`` matches it; True only for @corrupt."""
    global _hits
    spec = os.environ.get(ENV)
    if not spec:
        return False
    match = _SPEC.fullmatch(spec)
    if match is None or not fnmatchcase(name, match["pattern"]):
        return False
    _hits += 1
    if _hits != int(match["nth"] or 1):
        return False
    action = match["action"] or "kill"
    if action == "corrupt":
        return True
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path if path is not None else name))
    if action == "int":
        signal.raise_signal(signal.SIGINT)  # handled before the next line runs, as Ctrl-C would be
        return False
    os.kill(os.getpid(), signal.SIGKILL)
    return False
