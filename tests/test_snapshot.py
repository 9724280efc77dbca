"""Snapshots of what users read, so that a change to any of it is deliberate.

Two halves, both against files committed in ``tests/snapshots/``:

- ``results.json`` and ``results.csv`` of the fixed small pipeline ``snapshots/pipeline.yaml``,
  run through the CLI on an MNIST subset. Training on the CPU is deterministic, so every
  accuracy, count, size and parity figure must match; what the machine measures (latency,
  throughput) or what names the run (file paths, the gzip size of files carrying the run id,
  library versions, the CPU) is masked.
- the report (the page's content, the visible text of ``latest.html`` and ``summary.md``) built
  from ``snapshots/report_inputs.json``: the inputs the report stage gathered in one run of
  that pipeline (its second run, so the page also compares with a previous run). A recorded
  input makes the page reproducible to the byte, latency-dependent sentences ("the fastest
  variant is ...") included.

After an intended change, rewrite the snapshots and review the diff before committing:

    COMPRESS_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_snapshot.py
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from compress import report as reporting
from compress.variants import Variant
from tests.conftest import run_cli

SNAPSHOTS = Path(__file__).parent / "snapshots"
PIPELINE = SNAPSHOTS / "pipeline.yaml"
UPDATE = os.environ.get("COMPRESS_UPDATE_SNAPSHOTS") == "1"
# measured by this machine or naming this run: masked before comparing
VOLATILE = re.compile(
    r"^(latency_|throughput_)"
    r"|^(file|gzip_bytes|gzip_ratio|cpu_model|torch_version|onnxruntime_version|runtime_version)$"
)
MASK = "<masked>"
WORK = "<work>"


# float rounding of one runtime against another: its last digits move with the versions of
# onnxruntime and its neighbours, so the snapshot holds only that it is within export's 1e-4
PARITY_DIFF = "parity_max_abs_diff"


def _masked_value(key: str, value: Any) -> Any:
    if VOLATILE.search(key):
        return MASK
    if key == PARITY_DIFF and value not in (None, ""):
        return "<= 1e-4" if float(value) <= 1e-4 else value
    return value


def _masked_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: _masked_value(k, v) for k, v in row.items()} for row in rows]


def _csv_rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    return list(reader.fieldnames or []), _masked_rows(rows)


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _dump(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True, default=str) + "\n"


# ---------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """The pipeline run once; returns its reports directory. Exit 1: one gate fails on purpose."""
    cwd = tmp_path_factory.mktemp("snapshot")
    pipeline = cwd / PIPELINE.name
    shutil.copyfile(PIPELINE, pipeline)
    if UPDATE:
        _capture_report_inputs(cwd, pipeline, data_root)
    else:
        result = run_cli(pipeline, "-q", cwd=cwd, data_root=data_root)
        assert result.returncode == 1, result.output
    return cwd / "reports" / "snapshot"


def _capture_report_inputs(cwd: Path, pipeline: Path, data_root: Path) -> None:
    """Run in-process twice (the second run's page compares with the first) and keep the inputs
    the report stage hands to ``build_page`` in the second run."""
    from compress.run import main

    captured: list[reporting.ReportInputs] = []
    build_page = reporting.build_page

    def keep(inputs: reporting.ReportInputs) -> dict[str, Any]:
        captured.append(inputs)
        return build_page(inputs)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv("COMPRESS_DATA_ROOT", str(data_root))
        patch.setattr(reporting, "build_page", keep)
        assert main([str(pipeline), "-q"]) == 1
        assert main([str(pipeline), "-q"]) == 1
    first, inputs = captured
    assert inputs.previous is not None and inputs.previous["run_id"] == first.manifest["run_id"]
    text = _dump(dataclasses.asdict(inputs)).replace(str(cwd.resolve()), WORK).replace(str(cwd), WORK)
    _write(SNAPSHOTS / "report_inputs.json", text)


# ---------------------------------------------------------------- results table


def test_results_json_matches_the_snapshot(snapshot_run: Path) -> None:
    rows = json.loads((snapshot_run / "results.json").read_text(encoding="utf-8"))
    current = _dump(_masked_rows(rows))
    expected_file = SNAPSHOTS / "results.json"
    if UPDATE:
        _write(expected_file, current)
    assert current == expected_file.read_text(encoding="utf-8")


def test_results_csv_matches_the_snapshot(snapshot_run: Path) -> None:
    header, rows = _csv_rows((snapshot_run / "results.csv").read_text(encoding="utf-8"))
    current = _dump({"columns": header, "rows": rows})
    expected_file = SNAPSHOTS / "results.csv.json"
    if UPDATE:
        _write(expected_file, current)
    assert current == expected_file.read_text(encoding="utf-8")


# ---------------------------------------------------------------- the report


class _VisibleText(HTMLParser):
    """The text a reader sees: no style, no script, one line per text node."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script"):
            self._skip += 1
        if tag == "img":
            self.lines.append(f"[image: {dict(attrs).get('alt', '')}]")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if text and not self._skip:
            self.lines.append(text)


def _recorded_inputs() -> reporting.ReportInputs:
    data = json.loads((SNAPSHOTS / "report_inputs.json").read_text(encoding="utf-8"))
    data["variants"] = {
        name: Variant(**{**v, "file": Path(v["file"])}) for name, v in data["variants"].items()
    }
    return reporting.ReportInputs(**data)


def _page_content(page: dict[str, Any]) -> dict[str, Any]:
    """The page's dict with each chart's SVG replaced by its hash."""
    content = json.loads(json.dumps(page, default=str))
    for chart in content.get("charts", []):
        uri = chart.pop("uri", "")
        chart["svg_sha256"] = hashlib.sha256(uri.encode()).hexdigest()
    return content


def test_report_built_from_recorded_inputs_matches_the_snapshot(snapshot_run: Path) -> None:
    page = reporting.build_page(_recorded_inputs())
    parser = _VisibleText()
    parser.feed(reporting.render_html(page))
    current = {
        "report_page.json": _dump(_page_content(page)),
        "report.txt": "\n".join(parser.lines) + "\n",
        "summary.md": reporting.render_markdown(page),
    }
    if UPDATE:
        for name, text in current.items():
            _write(SNAPSHOTS / name, text)
    for name, text in current.items():
        assert text == (SNAPSHOTS / name).read_text(encoding="utf-8"), f"{name} differs from the snapshot"
