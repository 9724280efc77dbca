"""One loader per runtime: ``load(path, threads) -> run(x: np.ndarray) -> np.ndarray``.

Each file imports only numpy and its runtime at the top, because ``compress.verify`` runs the
file's own source in an isolated child process where torch, onnx and compress are blocked.
The benchmark stage imports the same files, so what is verified is what is timed.
"""

from types import ModuleType


def runner(name: str) -> ModuleType:
    """The runner module by name, imported only when asked for (each pulls in its runtime)."""
    if name == "onnxruntime":
        from compress.ship.targets.runners import onnxruntime as module
    elif name == "openvino":
        from compress.ship.targets.runners import openvino as module
    elif name == "litert":
        from compress.ship.targets.runners import litert as module
    elif name == "executorch":
        from compress.ship.targets.runners import executorch as module
    else:
        raise KeyError(f"no runner named {name!r}")
    return module
