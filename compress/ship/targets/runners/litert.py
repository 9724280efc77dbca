"""The LiteRT (TFLite) interpreter.

LiteRT models from litert-torch have a fixed batch (1 here: a flatten does not convert with
a dynamic batch), so a batch of N runs as N invocations; the benchmark reports it as such.
"""

import numpy as np
from ai_edge_litert import __version__ as _version
from ai_edge_litert.interpreter import Interpreter


def load(path, threads=1):
    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    fixed = int(source["shape"][0])

    def run(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        outputs = []
        for start in range(0, len(x), fixed):
            chunk = x[start : start + fixed]
            if len(chunk) < fixed:  # the last partial batch: pad, then drop the padding
                chunk = np.concatenate([chunk, np.zeros((fixed - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            interpreter.set_tensor(source["index"], chunk)
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(target["index"]).copy())
        return np.concatenate(outputs)[: len(x)]

    return run


def version():
    return _version
