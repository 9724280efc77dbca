"""The edge targets by name: what each ships, which runtime runs it, and how to install it.

Standard library only: ``compress.verify`` and the config validators read it, and neither
may pull in torch or a runtime just to know a name.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str  # as written under export.targets
    runtime: str  # the benchmark's runtime name for the same files
    label: str  # how the report and the bundle README name it
    suffix: str  # the file that is loaded (OpenVINO's .xml has a .bin beside it)
    runner: str  # module under compress.ship.targets.runners: load(path, threads) -> run(x)
    converter: str | None  # module under compress.ship.targets making the file (None: the ONNX itself)
    packages: tuple[str, ...]  # import names the converter and the runner need
    extra: str | None  # pip extra that installs them (None: a core dependency)
    int8: bool  # int8 ONNX variants ship here (the runtime reads QDQ/QOperator ONNX)
    child_allows: tuple[str, ...] = ()  # modules the verify child may import besides numpy
    run_packages: tuple[str, ...] | None = None  # what running needs, if less than converting

    @property
    def runtime_packages(self) -> tuple[str, ...]:
        return self.run_packages if self.run_packages is not None else self.packages


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("onnx", "onnxruntime", "ONNX (onnxruntime)", ".onnx", "onnxruntime", None,
               ("onnxruntime",), None, True),
        Target("ort", "ort", "ORT format (onnxruntime / ORT Mobile)", ".ort", "onnxruntime", "ort",
               ("onnxruntime",), None, True),
        Target("openvino", "openvino", "OpenVINO IR (OpenVINO CPU)", ".xml", "openvino", "openvino",
               ("openvino",), "openvino", True),
        Target("tflite", "litert", "LiteRT / TFLite (LiteRT interpreter)", ".tflite", "litert", "tflite",
               ("litert_torch", "ai_edge_litert"), "litert", False, run_packages=("ai_edge_litert",)),
        # ExecuTorch's Python runtime hands tensors over as torch tensors, so its verify child
        # may import torch (a device runs the C++ runtime, which needs none of it).
        Target("executorch", "executorch", "ExecuTorch .pte (XNNPACK)", ".pte", "executorch", "executorch",
               ("executorch",), "executorch", False, child_allows=("torch",)),
    )
}  # fmt: skip
RUNTIMES = {t.runtime: t for t in TARGETS.values()}


def missing_packages(target: Target, running_only: bool = False) -> list[str]:
    """Import names the target needs (to convert, or only to run) that are not installed here."""
    needed = target.runtime_packages if running_only else target.packages
    return [name for name in needed if importlib.util.find_spec(name) is None]


def install_hint(target: Target) -> str:
    return f"pip install -e '.[{target.extra}]'" if target.extra else "pip install -e ."
