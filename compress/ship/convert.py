"""Turning a torch model into the files that ship: ONNX and TorchScript.

One function per format, used by the export stage and by any stage that needs an ONNX
file of its input (the onnxruntime quantizer), so every ONNX file is made the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from collections import OrderedDict
from pathlib import Path

import onnx
import torch
from torch import nn

from compress.fileio import atomic_path
from compress.ship import function_table

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18

log = logging.getLogger(__name__)


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    path: Path,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A single-file ONNX model with a dynamic batch dimension and named input/output.

    The exporter takes 0.5-5 s a model, and a run exports the same model more than once (the
    quantizer's fp32 file of a parent, then the export stage's), so each distinct model is
    exported once per process (``_content_key``) and written again with its own metadata."""
    model = model.eval().cpu()
    key = _content_key(model, sample, opset)
    if key is None:
        proto = _export_proto(model, sample, opset)
    else:
        if key not in _EXPORTED:
            _EXPORTED[key] = _export_proto(model, sample, opset).SerializeToString()
            while len(_EXPORTED) > _KEEP:  # a tuning study exports a new model every trial
                _EXPORTED.popitem(last=False)
        _EXPORTED.move_to_end(key)
        proto = onnx.ModelProto.FromString(_EXPORTED[key])
    if metadata:
        set_metadata(proto, metadata)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
    return path


# this process's latest ONNX exports by content key, in bytes: the parents a quantize stage
# exports are reused by the export stage that follows; older ones are dropped
_EXPORTED: OrderedDict[str, bytes] = OrderedDict()
_KEEP = 16


def _export_proto(model: nn.Module, sample: torch.Tensor, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=65536)
    buffer = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(buffer),
        _quiet_loggers(),
        function_table.built_once(),
        out_of_place(model),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (sample.cpu(),),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    log.debug("onnx export log: %s", buffer.getvalue())
    proto = program.model_proto
    strip_debug_metadata(proto.graph)
    return proto


def _content_key(model: nn.Module, sample: torch.Tensor, opset: int) -> str | None:
    """What the exported graph depends on: every module's class (the very class object, so the
    same forward code), its printed form and plain attributes, every parameter and buffer, the
    input's shape past the (dynamic) batch dimension and its dtype, and the opset. None (export
    every time) when a module has hooks or a tensor is not plain: what else they change is unknown."""
    digest = hashlib.sha256(f"{opset} {tuple(sample.shape[1:])} {sample.dtype}".encode())
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        plain = {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, tuple))}
        digest.update(f"{name} {id(type(module))} {module.extra_repr()} {sorted(plain.items())!r}".encode())
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.is_quantized or value.layout != torch.strided:
            return None
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def out_of_place(model: nn.Module):
    """Export activations that work in place (``nn.ReLU(inplace=True)``, Hardswish, ...) as their
    out-of-place form, then put the flags back. The exporter's functionalization decomposes each
    in-place op at length: MobileNetV3-small exported in 7.0 s with them and 3.7 s without,
    ResNet-18 in 1.9 s and 1.6 s, with the same ONNX nodes and outputs; MobileNetV3's ExecuTorch
    program took 25.3 s and 18.3 s, the same bytes. In eval mode the two forms compute the same
    values. Every converter that traces the model with torch.export uses it."""
    flipped = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for module in flipped:
        module.inplace = False
    try:
        yield
    finally:
        for module in flipped:
            module.inplace = True


@contextlib.contextmanager
def _quiet_loggers(names: tuple[str, ...] = ("onnxscript", "onnx_ir", "torch.onnx")):
    """The exporter's passes log every rewrite at INFO; keep them out of the run log."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def strip_debug_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node debugging notes (stack traces with our source paths, FX node
    text, module names): they are a quarter of a small model's file, make its size depend on
    where the code was installed, and tell an edge team nothing about how to run it."""
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                strip_debug_metadata(attribute.g)
            for sub in attribute.graphs:
                strip_debug_metadata(sub)


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def export_torchscript(
    model: nn.Module,
    sample: torch.Tensor,
    path: Path,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """A traced TorchScript file that loads with ``torch.jit.load`` alone.

    ``extra_files`` (name -> text) are stored inside the archive, e.g. ``model.json`` with the
    same facts an ONNX file carries in its metadata; read them back with
    ``torch.jit.load(path, _extra_files={"model.json": ""})``.
    """
    model = model.eval().cpu()
    with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, sample.cpu())
        traced.save(str(tmp), _extra_files=dict(extra_files or {}))
    return path


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on the CPU in eval mode, without its deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()
