"""Edge runtimes the deploy bundle can ship to: onnx, ort, openvino, tflite, executorch.

``registry`` (standard library only, so ``compress.verify`` can read it without torch) names
each target, its files, the package that runs it and the pip extra that installs it;
``runners/`` holds one loader per runtime that imports only numpy and that runtime (the
verify child runs the file's own source); ``child`` runs a file in a fresh process;
the converters (``ort``, ``openvino``, ``tflite``, ``executorch``) make the files;
``compress.ship.edge`` converts every exported variant to every target and keeps what passes parity.
"""

from compress.ship.targets.registry import TARGETS, Target, missing_packages

__all__ = ["TARGETS", "Target", "missing_packages"]
