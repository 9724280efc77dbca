"""OpenVINO on the CPU, reading IR (``.xml`` + ``.bin``) or ONNX.

Inference precision is pinned to f32: on CPUs with bf16 units OpenVINO otherwise computes in
bf16 by default (measured here: LeNet-5 logits 1.3e-3 from PyTorch's instead of 2.6e-7).
"""

import numpy as np
import openvino as ov


def load(path, threads=1):
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        result = request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(result[compiled.output(0)]).copy()

    return run


def version():
    return ov.__version__
