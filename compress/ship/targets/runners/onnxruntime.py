"""onnxruntime on the CPU: runs ``.onnx`` and ``.ort`` files alike (ORT Mobile's format)."""

import numpy as np
import onnxruntime as ort


def load(path, threads=1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x):
        return np.asarray(session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0])

    return run


def version():
    return ort.__version__
