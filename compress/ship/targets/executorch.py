"""ExecuTorch program (``.pte``) from the PyTorch model: torch.export, then the XNNPACK delegate.

The batch dimension is exported as dynamic (1..MAX_BATCH), so the same program serves batch 1
and batch 64; the example batch is MAX_BATCH images, because ExecuTorch plans its memory for
the example's size (measured here: exported at batch 2 with a bound of 1024, batch 32 failed
with error 0x10 at set_inputs). fp32 only: int8 ONNX variants have no PyTorch model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.ship.convert import out_of_place
from compress.ship.targets.runners.executorch import MAX_BATCH
from compress.ship.targets.source import Source, needs_model


def convert(source: Source, work: Path) -> list[Path]:
    model = needs_model(source, "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = source.example[:MAX_BATCH]
    example = example.repeat((MAX_BATCH + len(example) - 1) // len(example), 1, 1, 1)[:MAX_BATCH].contiguous()
    with out_of_place(model):
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = work / f"{source.base}.pte"
    path.write_bytes(lowered.buffer)
    return [path]
