"""ExecuTorch's Python runtime on a ``.pte`` program (XNNPACK-delegated where lowered).

Its Python binding takes and returns torch tensors, so this runner converts at the edges;
the timing includes those zero-copy conversions. Programs are planned for batches up to
MAX_BATCH (the converter exports at that size: ExecuTorch sizes its memory plan from the
example batch, not from the dynamic dimension's bound), so larger batches run in chunks.
"""

from importlib import metadata

import numpy as np
import torch
from executorch.runtime import Runtime

MAX_BATCH = 64


def load(path, threads=1):
    torch.set_num_threads(threads)
    method = Runtime.get().load_program(str(path)).load_method("forward")

    def run(x):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        chunks = [
            method.execute([x[i : i + MAX_BATCH]])[0].numpy().copy() for i in range(0, len(x), MAX_BATCH)
        ]
        return np.concatenate(chunks)

    return run


def version():
    return metadata.version("executorch")
