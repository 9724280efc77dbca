"""OpenVINO IR (``.xml`` + ``.bin``) from the exported ONNX, weights kept in fp32.

``compress_to_fp16=False``: OpenVINO's default halves the weights on save, which changes the
model we checked; an edge team can still compress later with OpenVINO's own tools.
"""

from __future__ import annotations

from pathlib import Path

from compress.ship.targets.source import Source, needs_onnx


def convert(source: Source, work: Path) -> list[Path]:
    import openvino as ov

    xml = work / f"{source.base}.xml"
    model = ov.convert_model(str(needs_onnx(source, "openvino")))
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return [xml, xml.with_suffix(".bin")]
