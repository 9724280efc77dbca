"""The deploy bundle: the folder an edge team can take and run without our code.

Written by the export stage, checked by ``python -m compress.verify DIR``::

    <variant>.onnx            one per shipped model, metadata_props say how to feed it
    <variant>.model.json      the same facts as the ONNX metadata, plus parity numbers
    <variant>.expected.npy    the model's logits for sample_input.npy (float32)
    sample_input.npy          preprocessed float32 NCHW batch (what the models take)
    sample_pixels.npy         the same images as raw uint8 pixels
    sample_labels.npy         their true labels (int64)
    labels.json               class names, in class-index order
    bundle.json               machine-readable index of all the above (for verify)
    README.md                 what each file is, accuracy and size, a numpy+onnxruntime snippet
    SHA256SUMS                sha256 of every other file (``sha256sum -c SHA256SUMS`` works)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.fileio import sha256_file, write_json, write_text
from compress.measure import file_size, gzip_size
from compress.ship.convert import INPUT_NAME, OUTPUT_NAME
from compress.ship.edge import tolerance as quantized_tolerance
from compress.ship.targets.registry import TARGETS
from compress.ship.targets.snippets import snippet
from compress.ship.verify import BUNDLE_FORMAT, INDEX, SUMS

SAMPLE_INPUT = "sample_input.npy"
SAMPLE_PIXELS = "sample_pixels.npy"
SAMPLE_LABELS = "sample_labels.npy"
LABELS = "labels.json"
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QGemm",
    "QLinearAdd",
    "DynamicQuantizeMatMul",
}


@dataclass
class TargetFiles:
    """One variant's files for one edge target (``compress.ship.targets``), checked in its runtime."""

    variant: str
    target: str
    files: list[Path]  # the file the runtime loads first (OpenVINO: .xml, then its .bin)
    expected: np.ndarray  # the source model's logits for sample_input.npy
    parity: dict[str, Any]
    test_accuracy: float | None


@dataclass
class ShippedModel:
    variant: str
    file: Path
    expected: np.ndarray
    metadata: dict[str, Any]  # the facts also written to the ONNX metadata_props
    parity: dict[str, Any]
    test_accuracy: float | None
    quantized: bool = False
    atol: float = 1e-4
    extra: dict[str, Any] = field(default_factory=dict)


def model_json_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name[: -len(".onnx")] + ".model.json")


def expected_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name[: -len(".onnx")] + ".expected.npy")


def is_quantized(path: Path) -> bool:
    proto = onnx.load(str(path), load_external_data=False)
    return any(node.op_type in QUANTIZED_OPS for node in proto.graph.node)


def is_fp16(path: Path) -> bool:
    """An fp16 ONNX (weights stored as float16, e.g. the quantize stage's fp16 mode)."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)


def tolerance(model: ShippedModel) -> float:
    return quantized_tolerance(model.expected, model.quantized, model.atol)


def write_bundle(
    directory: Path,
    models: list[ShippedModel],
    *,
    pixels: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    facts: dict[str, Any],
    targets: list[TargetFiles] | None = None,
    bundle_files: list[Path] | None = None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / SAMPLE_INPUT, np.ascontiguousarray(images, dtype=np.float32))
    np.save(directory / SAMPLE_PIXELS, np.ascontiguousarray(pixels, dtype=np.uint8))
    np.save(directory / SAMPLE_LABELS, np.ascontiguousarray(labels, dtype=np.int64))
    write_json(directory / LABELS, list(classes))
    entries = []
    for model in models:
        expected = expected_path(model.file)
        np.save(expected, np.ascontiguousarray(model.expected, dtype=np.float32))
        info = dict(model.metadata)
        info.update(file=model.file.name, format="onnx", quantized=model.quantized, parity=model.parity)
        write_json(model_json_path(model.file), info)
        entries.append(
            {
                "variant": model.variant,
                "file": model.file.name,
                "model_json": model_json_path(model.file).name,
                "expected": expected.name,
                "atol": tolerance(model),
                "quantized": model.quantized,
                "test_accuracy": model.test_accuracy,
                "size_bytes": file_size(model.file),
                "gzip_bytes": gzip_size(model.file),
                "sha256": sha256_file(model.file),
                "stage": info.get("stage"),
                "parent": info.get("parent"),
                "target": "onnx",
                "runtime": TARGETS["onnx"].runtime,
                "files": [model.file.name],
            }
        )
    by_variant = {m.variant: m for m in models}
    for shipped in targets or []:
        entries.append(_target_entry(directory, shipped, by_variant.get(shipped.variant)))
    index = {
        "format": BUNDLE_FORMAT,
        **{k: facts.get(k) for k in ("pipeline", "run_id", "compress_version")},
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", *images.shape[1:]]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(classes)]},
        "preprocessing": facts.get("preprocessing"),
        "labels": LABELS,
        "sample_input": SAMPLE_INPUT,
        "sample_pixels": SAMPLE_PIXELS,
        "sample_labels": SAMPLE_LABELS,
        "models": entries,
        "extra_files": [p.name for p in bundle_files or []],
    }
    write_json(directory / INDEX, index)
    write_text(directory / "README.md", readme(index, classes))
    write_sums(directory)


def _target_entry(directory: Path, shipped: TargetFiles, onnx: ShippedModel | None) -> dict[str, Any]:
    """The index entry of one edge-target file; its expected logits are the source model's."""
    expected = directory / f"{shipped.files[0].stem}.reference.npy"
    if not expected.exists():
        np.save(expected, np.ascontiguousarray(shipped.expected, dtype=np.float32))
    info = onnx.metadata if onnx is not None else {}
    return {
        "variant": shipped.variant,
        "target": shipped.target,
        "runtime": TARGETS[shipped.target].runtime,
        "file": shipped.files[0].name,
        "files": [p.name for p in shipped.files],
        "expected": expected.name,
        "atol": shipped.parity["atol"],
        "quantized": bool(onnx.quantized) if onnx is not None else False,
        "test_accuracy": shipped.test_accuracy,
        "size_bytes": sum(file_size(p) for p in shipped.files),
        "gzip_bytes": sum(gzip_size(p) for p in shipped.files),
        "sha256": sha256_file(shipped.files[0]),
        "stage": info.get("stage"),
        "parent": info.get("parent"),
        "parity": {
            k: shipped.parity.get(k) for k in ("max_abs_diff", "top1_agreement", "samples", "runtime_version")
        },
    }


def write_sums(directory: Path) -> None:
    lines = [
        f"{sha256_file(path)}  {path.name}"
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != SUMS and not path.name.startswith(".")
    ]
    write_text(directory / SUMS, "\n".join(lines) + "\n")


def readme(index: dict[str, Any], classes: list[str]) -> str:
    models = index["models"]
    shape = ", ".join(str(d) for d in index["input"]["shape"][1:])
    pre = index["preprocessing"] or {}
    lines = [
        f"# Deploy bundle: {index['pipeline']} (run {index['run_id']})",
        "",
        "Every model here runs in one runtime alone, with numpy: single-file ONNX models (opset >= 17)",
        "for onnxruntime, and where listed the same model for onnxruntime's ORT format (`.ort`, ORT",
        "Mobile), OpenVINO (`.xml` + `.bin`), LiteRT (`.tflite`, batch 1) and ExecuTorch (`.pte`).",
        "Each file was shipped only after its runtime, in a fresh process, reproduced the PyTorch",
        "model's predictions (see `parity` in `bundle.json`).",
        f"Input `{index['input']['name']}`: float32, shape (batch, {shape}), NCHW, any batch size.",
        f"Output `{index['output']['name']}`: float32 (batch, {len(classes)}), one logit per class;",
        "the prediction is the argmax, its name is in `labels.json`.",
        "",
        f"Preprocessing: `{pre.get('formula', '')}` with mean {pre.get('mean')} and std {pre.get('std')}.",
        "The same facts are in each model's ONNX metadata_props and in `<model>.model.json`.",
        "",
        "| file | runtime | variant | test accuracy | size | gzip size | made by |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        acc = f"{100 * m['test_accuracy']:.2f}%" if isinstance(m["test_accuracy"], float) else "n/a"
        made = m.get("stage") or ""
        if m.get("parent"):
            made += f" (from {m['parent']})"
        lines.append(
            f"| `{m['file']}` | {TARGETS[m.get('target', 'onnx')].label} | "
            f"{m['variant']}{' (int8)' if m['quantized'] else ''} | {acc} | "
            f"{_kb(m['size_bytes'])} | {_kb(m['gzip_bytes'])} | {made} |"
        )
    if not models:
        lines.append("| (none: every export failed; see the export stage's export.json) | | | | | | |")
    lines += [
        "",
        "Test accuracy is top-1 on the held-out test split, measured in PyTorch before export; the",
        "ONNX files were checked against it (see `parity` in each `.model.json`). Latency for each",
        f"model and runtime is measured by the benchmark stage: `reports/{index['pipeline']}/results.csv`.",
        "",
        "## Run a model with numpy and onnxruntime only",
        "",
        "```python",
        *snippet("onnx", models[0]["file"] if models else "MODEL.onnx"),
        "```",
        "",
    ]
    for target in dict.fromkeys(m.get("target", "onnx") for m in models):
        if target == "onnx":
            continue
        first = next(m for m in models if m.get("target") == target)
        lines += [
            f"## Run it in {TARGETS[target].label}",
            "",
            "```python",
            *snippet(target, first["file"]),
            "```",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `<variant>.onnx`: the model; `<variant>.model.json`: its metadata and parity check;",
        "  `<variant>.expected.npy`: its logits for `sample_input.npy`.",
        "- `<variant>.ort`, `.xml` + `.bin`, `.tflite`, `.pte`: the same model for another runtime;",
        "  `<variant>.reference.npy`: the PyTorch model's logits for `sample_input.npy`, which each",
        "  of them must reproduce; `required_operators.config`: the operators (and opsets) of every",
        "  `.ort` model, for a reduced ORT Mobile build (`build.sh --include_ops_by_config`).",
        "- `sample_pixels.npy` (uint8 raw images), `sample_input.npy` (the same, preprocessed),",
        "  `sample_labels.npy` (true classes), `labels.json` (class names in class-index order).",
        "- `bundle.json`: index of all of the above; `SHA256SUMS`: checksums (`sha256sum -c SHA256SUMS`).",
        "",
        "Check the bundle (checksums, then every model file in a fresh process with numpy and its runtime):",
        "`python -m compress.verify <this folder>`.",
        "",
    ]
    return "\n".join(lines)


def _kb(size: int) -> str:
    return f"{size / 1024:.1f} KiB" if size < 1 << 20 else f"{size / (1 << 20):.2f} MiB"
