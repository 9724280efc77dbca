"""Mode ``static`` (onnxruntime ``quantize_static``, QDQ): int8 weights and activations whose
ranges are calibrated on training images. A variant that misses the tolerance keeps its most
sensitive weight layers in fp32 (the accuracy fallback); calibration starts from the parent with
re-estimated BatchNorm statistics (``Job.calibration_model``)."""

from __future__ import annotations

from pathlib import Path

from compress.quantization import ort
from compress.quantization.job import Job
from compress.quantization.modes.onnxruntime import OnnxParent, OnnxPass


def onnx_pass(job: Job, parent: OnnxParent, work: Path) -> OnnxPass:
    """Static QDQ int8 of the calibration file, ``excluded`` nodes left in fp32; every trial
    reuses one calibration cache in ``work``."""
    from onnxruntime.quantization.registry import QDQRegistry  # the op types static QDQ can quantize

    settings = parent.settings
    weight_nodes = [n for n, t in parent.nodes if t in ort.WEIGHT_OP_TYPES]
    quantizable = [n for n, t in parent.nodes if t in QDQRegistry]
    reader = ort.ImageReader(job.images, job.cfg.calibration.batch_size)
    cache = work / "calibration.json"
    calibrated = _calibration_onnx(job, parent)

    def make(excluded: list[str], path: Path) -> Path:
        return ort.quantize_onnx_static(calibrated, path, reader, settings, excluded, cache)

    path_used = (
        f"onnxruntime quantize_static(QDQ, {settings.activation_type} activations, "
        f"{settings.weight_type} weights, {settings.calibration_method} calibration)"
    )
    return OnnxPass(make, weight_nodes, quantizable, path_used)


def _calibration_onnx(job: Job, parent: OnnxParent) -> Path:
    """The pre-processed fp32 ONNX that static calibration starts from: the parent's, or its copy
    with re-estimated BatchNorm statistics, exported once per parent into the work directory (the
    stage deletes it; the fp32 reference stays the parent's)."""
    model = job.calibration_model()
    if model is job.model:
        return parent.pre
    work = job.work_dir(job.parent.name)
    adapted = work / "fp32-bn-pre.onnx"
    if not adapted.is_file():
        ort.prepare_onnx(model, job.sample[:2], work / "fp32-bn.onnx", adapted, parent.meta)
    return adapted
