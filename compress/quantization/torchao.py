"""PyTorch int8 with torchao: the PT2E flow (``prepare_pt2e``/``convert_pt2e``, X86 inductor
quantizer) for static int8, ``quantize_`` for dynamic int8 of Linear layers, and saving the
result as a ``torch.export`` program (.pt2)."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("compress.quantization")


def _export(model: nn.Module, sample: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))


def export_for_quantizer(model: nn.Module, sample: torch.Tensor) -> torch.fx.GraphModule:
    """The graph a PT2E quantizer annotates: ``torch.export`` with a dynamic batch, one source
    partition per module call.

    The quantizer groups ops into partitions by the module that made them (``nn_module_stack``),
    so a module called twice (the ``self.relu`` torchvision's ResNet blocks call after the first
    convolution and after the residual add) yields one partition with two outputs, which the X86
    quantizer's fusion patterns reject ("Input partition has more than one output node",
    pytorch/ao#4478): no torchvision ResNet could be quantized. Renaming the module of the second
    and later calls (``layer1.0.relu__call2``) gives each call its own partition; nothing else in
    the graph changes. (A weight layer called twice would be excluded from int8 by name at its
    first call only.)
    """
    graph = _export(model, sample.cpu()).module()
    calls: Counter[tuple[str, object]] = Counter()
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (fqn, cls) = list(stack.items())[-1]
        calls[fqn, node.target] += 1
        if calls[fqn, node.target] > 1:
            renamed = dict(stack)
            renamed[key] = (f"{fqn}__call{calls[fqn, node.target]}", cls)
            node.meta["nn_module_stack"] = renamed
    return graph


def pt2e_static(
    model: nn.Module,
    sample: torch.Tensor,
    images: torch.Tensor,
    exclude: Sequence[str] = (),
    reduce_range: bool = False,
    batch_size: int = 64,
) -> nn.Module:
    """torchao PT2E static int8 with the X86 inductor quantizer, calibrated on ``images``.

    ``exclude`` names modules (e.g. ``classifier``) left in fp32.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    for name in exclude:
        quantizer.set_module_name_qconfig(name, None)
    graph = export_for_quantizer(copy.deepcopy(model).eval(), sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                prepared(images[start : start + batch_size])
        return _drop_unused_tensors(convert_pt2e(prepared))


def _drop_unused_tensors(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_pt2e keeps the fp32 weights beside their int8 copies; drop those no node reads,
    or a saved program would carry both."""
    used = {str(n.target) for n in graph.graph.nodes if n.op == "get_attr"}
    named = [*graph.named_parameters(remove_duplicate=False), *graph.named_buffers(remove_duplicate=False)]
    for name, _ in named:
        if name in used:
            continue
        owner, _, attr = name.rpartition(".")
        module = graph.get_submodule(owner) if owner else graph
        if attr in module._parameters:
            del module._parameters[attr]
        elif attr in module._buffers:
            del module._buffers[attr]
    graph.delete_all_unused_submodules()
    graph.recompile()
    return graph


def torchao_dynamic(model: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, str]:
    """Dynamic int8 of Linear layers; returns the module and which path made it."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantized = copy.deepcopy(model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(quantized, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        with torch.no_grad():
            quantized(sample)
        return quantized, "torchao.quantize_(Int8DynamicActivationInt8WeightConfig): Linear layers"
    except Exception as exc:  # an API change must not cost the run: fall back to PT2E dynamic
        log.warning("torchao quantize_ failed (%s); using the PT2E dynamic config instead", exc)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(export_for_quantizer(copy.deepcopy(model).eval(), sample), quantizer)
        with torch.no_grad():
            prepared(sample)
        return _drop_unused_tensors(
            convert_pt2e(prepared)
        ), "torchao PT2E X86InductorQuantizer(is_dynamic=True)"


def torchao_weight_only(model: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, str]:
    """int8 weights, float activations (torchao's Int8WeightOnlyConfig, Linear layers): the size
    win for targets without int8 kernels; convolutions stay fp32."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(quantized, Int8WeightOnlyConfig())
    with torch.no_grad():
        quantized(sample)
    return quantized, "torchao.quantize_(Int8WeightOnlyConfig): Linear weights int8, activations float"


def save_exported(module: nn.Module, sample: torch.Tensor, path: Path) -> nn.Module:
    """``torch.export.save`` a program and prove it reloads and computes the same logits.

    Returns the reloaded module (what ships); raises if any step fails.
    """
    program = _export(module, sample.clone())  # a clone: a view would store its whole base tensor
    staging = path.parent / f".{path.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        torch.export.save(program, str(staging / path.name))  # the archive is named after the file
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        expected, got = module(sample), loaded(sample)
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{path.name}: reloaded program differs ({(expected - got).abs().max():.3g})")
    return loaded


def torch_predictor(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return predict
