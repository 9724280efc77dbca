"""The ONNX exporter's table of ATen -> ONNX functions, built once per process, not per export.

torch.onnx builds that table from torchlib anew on every export: 1.1 s of a LeNet-5 export's
2.5 s here (cProfile of a walked mnist.yaml: 7 exports, 7.9 s in ``from_torchlib``). What it
holds depends on the opset, the installed onnxscript, and which torch operators are registered
when it is built: torchlib's functions for operators not yet registered are left out. Some
register late: 14 ``prims`` ops when ``torch._functorch.aot_autograd`` is first imported (by the
first export), the ``quantized_decomposed`` ops of a QAT model when torchao's quantizer is. So a
table is kept per opset and count of registered operators in the namespaces torchlib covers, and
one built before such a library loaded is built again. Only a custom translation table (which we
never pass) adds to a table. Where torch is laid out otherwise the exporter builds it as usual.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

_TABLES: dict[tuple, object] = {}  # (builder's arguments, operators known) -> table


@contextlib.contextmanager
def built_once() -> Iterator[None]:
    """Exports inside this block share the tables built so far (see the module docstring)."""
    try:
        import torch._functorch.aot_autograd  # noqa: F401 - registers its prims before a table is built
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        yield
        return
    owner = _registration.ONNXRegistry
    build = owner.__dict__.get("from_torchlib")
    if not isinstance(build, classmethod):
        yield
        return

    def from_table(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())), _operators_known())
        if key not in _TABLES:
            _TABLES[key] = build.__func__(cls, *args, **kwargs)
        return _TABLES[key]

    owner.from_torchlib = classmethod(from_table)
    try:
        yield
    finally:
        owner.from_torchlib = build


def prepare(opset: int) -> None:
    """Build the table an export at ``opset`` asks for now: a process that forks workers (the
    tests' CLI server) builds it once for all of them. Pure Python objects, no tensors, so the
    process can still fork safely."""
    from torch.onnx._internal.exporter import _constants, _registration

    with built_once():
        _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, _constants.TORCHLIB_OPSET))


def tables_built() -> int:
    return len(_TABLES)


def _operators_known() -> int:
    covered = _torchlib_namespaces()
    names = torch._C._dispatch_get_all_op_names()
    return sum(1 for name in names if not covered or name.split("::", 1)[0] in covered)


@functools.cache
def _torchlib_namespaces() -> frozenset[str]:
    """The operator namespaces torchlib has functions for (aten, prims, quantized_decomposed,
    ...); empty when onnxscript does not say, and then every operator counts."""
    try:
        import onnxscript.function_libs.torch_lib.ops  # noqa: F401 - fills the registry
        from onnxscript.function_libs.torch_lib import registration

        return frozenset(name.split("::", 1)[0] for name in registration.default_registry._registry)
    except (ImportError, AttributeError):
        return frozenset()
