"""The lines an edge team needs to run one bundle file: numpy and that runtime, nothing else.

Each snippet reads the preprocessing and the class names from ``bundle.json`` and
``labels.json`` (the ONNX snippet from the model's own metadata), turns the raw uint8
``sample_pixels.npy`` into the model's input and prints the predicted labels, so the README
shows the whole path from pixels to a label. ``tests/test_targets.py`` runs every one.
"""

from __future__ import annotations

_PREPROCESS = [
    'pixels = np.load("sample_pixels.npy")  # uint8, (N, C, H, W)',
    'mean = np.array(pre["mean"], np.float32).reshape(1, -1, 1, 1)',
    'std = np.array(pre["std"], np.float32).reshape(1, -1, 1, 1)',
    "x = ((pixels.astype(np.float32) / 255 - mean) / std).astype(np.float32)",
]
_FROM_INDEX = [
    'pre, labels = json.load(open("bundle.json"))["preprocessing"], json.load(open("labels.json"))'
]


def snippet(target: str, model_file: str) -> list[str]:
    """At most 15 lines: raw pixels -> preprocessing -> the runtime -> labels."""
    if target == "onnx":
        return [
            "import json, numpy as np, onnxruntime as ort",
            f'sess = ort.InferenceSession("{model_file}", providers=["CPUExecutionProvider"])',
            "meta = sess.get_modelmeta().custom_metadata_map",
            'pre, labels = json.loads(meta["preprocessing"]), json.loads(meta["labels"])',
            *_PREPROCESS,
            'logits = sess.run(["logits"], {"input": x})[0]',
            "print([labels[i] for i in logits.argmax(1)])",
        ]
    if target == "ort":  # the same API reads the ORT format; ORT Mobile's Java/Swift/C APIs mirror it
        return [
            "import json, numpy as np, onnxruntime as ort",
            f'sess = ort.InferenceSession("{model_file}", providers=["CPUExecutionProvider"])',
            *_FROM_INDEX,
            *_PREPROCESS,
            'logits = sess.run(["logits"], {"input": x})[0]',
            "print([labels[i] for i in logits.argmax(1)])",
        ]
    if target == "openvino":
        return [
            "import json, numpy as np, openvino as ov",
            f'model = ov.Core().compile_model("{model_file}", "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}})',
            *_FROM_INDEX,
            *_PREPROCESS,
            "logits = model(x)[model.output(0)]",
            "print([labels[i] for i in logits.argmax(1)])",
        ]
    if target == "tflite":
        return [
            "import json, numpy as np",
            "from ai_edge_litert.interpreter import Interpreter",
            f'interp = Interpreter(model_path="{model_file}"); interp.allocate_tensors()',
            'src, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]',
            *_FROM_INDEX,
            *_PREPROCESS,
            "logits = []  # the model takes one image at a time (batch 1)",
            "for image in x:",
            "    interp.set_tensor(src, image[None])",
            "    interp.invoke()",
            "    logits.append(interp.get_tensor(out)[0])",
            "print([labels[i] for i in np.argmax(logits, 1)])",
        ]
    if target == "executorch":  # ExecuTorch's Python binding passes torch tensors; on device it is C++
        return [
            "import json, numpy as np, torch",
            "from executorch.runtime import Runtime",
            f'method = Runtime.get().load_program("{model_file}").load_method("forward")',
            *_FROM_INDEX,
            *_PREPROCESS,
            "logits = method.execute([torch.from_numpy(x)])[0].numpy()  # batches of up to 64",
            "print([labels[i] for i in logits.argmax(1)])",
        ]
    raise KeyError(f"no snippet for target {target!r}")
