"""A pre-imported process that forks one fresh child per CLI run the tests ask for.

A new ``python -m compress.run`` spends 4-5 s importing torch, onnx, pandas and optuna before it
does anything; a test suite that runs the CLI a hundred times spends minutes on that alone. This
server imports them once and never computes anything itself, so forking it is safe (a process
that has run autograd or OpenMP work cannot fork a child that uses them; this one has not). Each
child is set up as a new process would be (working directory, environment, a bare root logger,
stdout and stderr to the files named), runs ``main(argv)`` of the command and exits with its code:
its memory and global state end with it, as a subprocess's would.

Protocol, one JSON object per line: the test writes ``{"module", "argv", "cwd", "env", "out",
"err"}``; the server answers ``{"pid": ...}`` once the child is forked (the test kills it if it
outlives its time) and ``{"code": ...}`` when it ends. One child at a time per server; a test
process that runs two at once starts a second server (``tests/conftest.py``).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from typing import Any

COMMANDS = ("compress.run", "compress.check")


def _preload() -> None:
    """The libraries every run imports, and those a stage imports when it first needs them: the
    dynamo ONNX exporter with onnxscript and networkx (~1 s, every run that exports), torch-pruning
    (3 s: it imports timm when installed; every run that prunes or validates channel pruning),
    onnxruntime's quantizer, the fp16 converter, and the report's modules; and the exporter's
    function table, which it builds once per process (1.1 s, ``compress.ship.function_table``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import networkx  # noqa: F401
    import onnx  # noqa: F401
    import onnx.reference  # noqa: F401
    import onnxconverter_common.float16  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxruntime.quantization  # noqa: F401
    import onnxruntime.quantization.shape_inference  # noqa: F401
    import onnxscript  # noqa: F401
    import onnxscript.function_libs.torch_lib.ops  # noqa: F401
    import onnxscript.rewriter  # noqa: F401
    import optuna  # noqa: F401
    import pandas  # noqa: F401
    import torch  # noqa: F401
    import torch._functorch.aot_autograd  # noqa: F401
    import torch.onnx._internal.exporter._core  # noqa: F401
    import torch_pruning  # noqa: F401
    import torchvision  # noqa: F401

    from compress.ship import convert, function_table
    from compress.stages import load_stages

    load_stages()
    importlib.import_module("compress.report.page")
    for name in COMMANDS:
        importlib.import_module(name)
    function_table.prepare(convert.DEFAULT_OPSET)  # last: a table built before a library loads is redone


def _child(request: dict[str, Any]) -> None:
    code = 1
    try:
        import io
        import logging
        import traceback

        out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the protocol pipe is the server's, not the run's
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        logging.getLogger().handlers[:] = []
        entry = importlib.import_module(request["module"]).main
        try:
            code = entry(request["argv"])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what an uncaught exception does to python -m: a traceback, exit 1
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(int(code))


def serve() -> None:
    _preload()
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _answer(reply, {"pid": pid})  # the caller kills it if it outlives its time
        _, status = os.waitpid(pid, 0)
        _answer(reply, {"code": os.waitstatus_to_exitcode(status)})


def _answer(reply: Any, message: dict[str, int]) -> None:
    reply.write(json.dumps(message) + "\n")
    reply.flush()


if __name__ == "__main__":
    serve()
