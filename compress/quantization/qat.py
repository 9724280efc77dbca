"""Quantization-aware training with torchao's PT2E flow, for a QDQ ONNX that onnxruntime runs in int8.

The flow (torchao's, nothing hand-written): ``torch.export`` the fp32 model in training mode,
``prepare_qat_pt2e`` with the X86 inductor quantizer (uint8 activations, int8 per-channel
symmetric weights, the recipe onnxruntime's QLinearConv/QGemm kernels take), fine-tune with the
fake-quant ops in the graph, ``convert_pt2e``, and export through the project's one ONNX
exporter: the quantize/dequantize pairs become ``QuantizeLinear``/``DequantizeLinear`` nodes that
onnxruntime fuses into int8 kernels at session start.

Batch norm: ``prepare_qat_pt2e`` rewrites every conv + batch-norm pair so the convolution sees
its weight already scaled by the batch norm (the folded weight is what gets fake-quantized, as
it will be after deployment); ``convert_pt2e`` folds the batch norm into the convolution for
good. Freezing happens at fixed points of the schedule (``Freezer``): after a share of the
steps the observers stop updating their ranges (the scales the int8 file will carry stop
moving, so the last steps train against fixed quantization grids), and the batch norms switch
to their running statistics, which is what the folded convolution will use at inference.

``ptq`` is the same quantizer calibrated without training, so ``mode: auto`` compares two
files that differ only in whether the weights were trained against the quantization.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from torch import nn

from compress.quantization.torchao import export_for_quantizer
from compress.ship.convert import export_onnx

log = logging.getLogger("compress.quantization")

# onnxruntime's int8 kernels; a QDQ file whose optimised graph has none of these runs in float
INT8_KERNELS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "MatMulIntegerToFloat",
    "ConvInteger",
    "MatMulInteger",
)


def _quantizer(weight_bits: int, is_qat: bool):
    """The X86 inductor quantizer, its weight grid narrowed to ``weight_bits`` (still stored as
    int8: fewer levels, the same kernels)."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat)
    if weight_bits < 8:
        half = 2 ** (weight_bits - 1)
        weight = dataclasses.replace(config.weight, quant_min=-half, quant_max=half - 1)
        if is_qat:
            # The fused fake-quant op derives its scale for a narrowed grid differently from the
            # observer that convert_pt2e asks (measured: 3-bit LeNet-5 lost 1 pp at conversion);
            # the plain FakeQuantize takes its scale from that observer, so training and the
            # converted file see the same grid.
            from torchao.quantization.pt2e import FakeQuantize, MovingAveragePerChannelMinMaxObserver

            weight = dataclasses.replace(
                weight,
                observer_or_fake_quant_ctr=FakeQuantize.with_args(
                    observer=MovingAveragePerChannelMinMaxObserver, eps=2**-12
                ),
            )
        config = dataclasses.replace(config, weight=weight)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(config)
    return quantizer


def prepare(model: nn.Module, sample: torch.Tensor, weight_bits: int = 8) -> nn.Module:
    """A trainable copy of ``model`` with fake-quant ops where the int8 file will quantize.

    The result accepts ``.train()``/``.eval()`` (torchao's ``allow_exported_model_train_eval``),
    so ``training.fit`` trains and validates it like any module.
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    graph = export_for_quantizer(copy.deepcopy(model).cpu().train(), sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_pt2e(graph, _quantizer(weight_bits, is_qat=True))
    return _train_eval(prepared)


def _train_eval(graph_module: nn.Module) -> nn.Module:
    """Let an exported module take ``.train()``/``.eval()`` (torchao rewrites the batch-norm and
    dropout nodes), returning the module as ``nn.Module`` does, so ``model.eval().cpu()`` works."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(graph_module)
    train = graph_module.train

    def train_returning_self(module: nn.Module, mode: bool = True) -> nn.Module:
        train(mode)
        return module

    def eval_returning_self(module: nn.Module) -> nn.Module:
        return module.train(False)

    graph_module.train = types.MethodType(train_returning_self, graph_module)
    graph_module.eval = types.MethodType(eval_returning_self, graph_module)
    return graph_module


def ptq(
    model: nn.Module, sample: torch.Tensor, images: torch.Tensor, weight_bits: int = 8, batch_size: int = 64
) -> nn.Module:
    """The same quantizer calibrated on ``images`` without training (static PTQ), converted."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    graph = export_for_quantizer(copy.deepcopy(model).cpu().eval(), sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(graph, _quantizer(weight_bits, is_qat=False))
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                prepared(images[start : start + batch_size])
    return convert(prepared)


def convert(prepared: nn.Module) -> nn.Module:
    """``convert_pt2e`` on the CPU in eval mode: batch norms folded, real quantize/dequantize ops."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = prepared.cpu()
    move_exported_model_to_eval(prepared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_pt2e(prepared)
    return _train_eval(converted)


class Freezer:
    """``after_step`` hook for ``training.fit``: stop the observers and freeze the batch norms
    after given step counts (0 = from the start; a share of 1 = after the last step, i.e. never).

    Freezing the batch norms rewrites their graph nodes to use running statistics; ``fit`` calls
    ``.train()`` every epoch, which would switch them back, so the module's ``train`` is wrapped
    to re-apply the freeze.
    """

    def __init__(self, model: nn.Module, observers_at: int, bn_at: int, step: int = 0) -> None:
        self.model, self.observers_at, self.bn_at = model, observers_at, bn_at
        self.step = step  # > 0 when ``fit`` resumes: the freezes due by then apply at once
        self.frozen: dict[str, int | None] = {"observers": None, "batch_norm": None}
        train = model.train

        def train_then_refreeze(module: nn.Module, mode: bool = True) -> nn.Module:
            train(mode)
            if mode and self.frozen["batch_norm"] is not None:
                _freeze_batch_norm(module)
            return module

        model.train = types.MethodType(train_then_refreeze, model)
        self._check()

    def __call__(self) -> None:
        self.step += 1
        self._check()

    def _check(self) -> None:
        from torchao.quantization.pt2e import disable_observer

        if self.frozen["observers"] is None and self.step >= self.observers_at:
            self.model.apply(disable_observer)
            self.frozen["observers"] = self.step
            log.info("qat: observers frozen after %d steps", self.step)
        if self.frozen["batch_norm"] is None and self.step >= self.bn_at:
            count = _freeze_batch_norm(self.model)
            self.frozen["batch_norm"] = self.step
            if count:
                log.info("qat: %d batch norms use running statistics after %d steps", count, self.step)


def keep_zeros(model: nn.Module) -> Callable[[], None]:
    """``after_step`` hook that keeps exactly-zero weights at zero, so fine-tuning a magnitude-pruned
    parent keeps its sparsity (a dense parent has no exact zeros: nothing is masked)."""
    masks = [
        (p, p.detach() != 0) for p in model.parameters() if p.dim() > 1 and bool((p.detach() == 0).any())
    ]

    @torch.no_grad()
    def apply() -> None:
        for param, mask in masks:
            param.mul_(mask.to(param.device))

    return apply


def _freeze_batch_norm(graph_module: nn.Module) -> int:
    """Set the ``training`` flag of every ``aten.batch_norm`` node to False (running statistics,
    no more updates), as the PT2E QAT recipe does; returns how many nodes there are."""
    count = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.batch_norm.default:
            args = list(node.args)
            args[5] = False
            node.args = tuple(args)
            count += 1
    if count:
        graph_module.recompile()
    return count


def export_qdq(converted: nn.Module, sample: torch.Tensor, path: Path, metadata: dict[str, str]) -> Path:
    """The converted program as a QDQ ONNX file, through the exporter every ONNX file uses."""
    return export_onnx(converted, sample.cpu(), path, metadata=metadata)


def int8_kernels(path: Path, optimized: Path) -> dict[str, int]:
    """How many of each int8 kernel onnxruntime's optimised graph of ``path`` holds.

    The QDQ file itself has only float ops between QuantizeLinear/DequantizeLinear pairs; what
    runs in int8 is decided by onnxruntime's fusions at session start, so this asks onnxruntime.
    Extended optimisation (not the hardware-specific layout passes), on the CPU.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    try:
        ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    finally:
        optimized.unlink(missing_ok=True)
    return {op: ops[op] for op in INT8_KERNELS if ops[op]}
