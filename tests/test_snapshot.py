"""Snapshots of what users read, so that a change to any of it is deliberate.

Two halves, both against files committed in ``tests/snapshots/``:

- ``results.json`` and ``results.csv`` of the fixed small pipeline ``snapshots/pipeline.yaml``,
  run through the CLI on an MNIST subset. Every key, column, variant, runtime, status and
  architecture count (MACs, parameters) must match exactly. Training on the CPU is repeatable on
  one machine but not across CPUs (AVX2 and AVX-512 kernels round differently, and a float that
  lands one ulp away moves an image across the decision boundary), so figures that follow from
  trained weights are held within a band: accuracies within 2 pp (10 of the 500 test images;
  the 1-epoch quarter-width student moved 1.4 pp between two regenerations on two machines),
  per-class accuracies (about 50 images each) within 20 pp, other figures within 10 %. What the
  machine measures (latency, throughput) or what names the run (file paths, the gzip size of
  files carrying the run id, library versions, the CPU) is masked.
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


# figures that follow from trained weights: (absolute band, relative band) per key
ACCURACY_BAND = {
    "accuracy": 0.02,
    "top1_agreement_pytorch": 0.02,
    "parity_top1_agreement": 0.02,
    "correct": 10,
    "accuracy_delta_pp": 3.0,
    "per_class_accuracy": 0.2,
    "per_class_min_accuracy": 0.2,
}
EXACT = {"macs", "parameters", "macs_ratio", "parameters_ratio", "test_count", "threads"}
RELATIVE_BAND = 0.1


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _mismatches(expected: Any, current: Any, where: str, key: str = "") -> list[str]:
    """Every place where ``current`` leaves the snapshot's band, named by its path."""
    if isinstance(expected, dict) and isinstance(current, dict):
        if list(expected) != list(current):
            return [f"{where}: keys {list(current)} != snapshot's {list(expected)}"]
        return [
            m
            for k in expected
            for m in _mismatches(expected[k], current[k], f"{where}.{k}", key if key in ACCURACY_BAND else k)
        ]
    if isinstance(expected, list) and isinstance(current, list):
        if len(expected) != len(current):
            return [f"{where}: {len(current)} items != snapshot's {len(expected)}"]
        return [
            m
            for i, (e, c) in enumerate(zip(expected, current, strict=True))
            for m in _mismatches(e, c, f"{where}[{i}]", key)
        ]
    if isinstance(expected, str) and expected.startswith("{") and isinstance(current, str):
        return _mismatches(json.loads(expected), json.loads(current), where, key)
    want, got = _number(expected), _number(current)
    if want is None or got is None or key in EXACT:
        return [] if expected == current else [f"{where}: {current!r} != snapshot's {expected!r}"]
    band = ACCURACY_BAND.get(key, RELATIVE_BAND * abs(want))
    if abs(got - want) <= band:
        return []
    return [f"{where}: {current!r} is outside snapshot's {expected!r} +- {band:g}"]


def _check_snapshot(expected_file: Path, current: Any) -> None:
    if UPDATE:
        _write(expected_file, _dump(current))
    expected = json.loads(expected_file.read_text(encoding="utf-8"))
    problems = _mismatches(expected, json.loads(_dump(current)), expected_file.name)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_results_json_matches_the_snapshot(snapshot_run: Path) -> None:
    rows = json.loads((snapshot_run / "results.json").read_text(encoding="utf-8"))
    _check_snapshot(SNAPSHOTS / "results.json", _masked_rows(rows))


@pytest.mark.slow
def test_results_csv_matches_the_snapshot(snapshot_run: Path) -> None:
    header, rows = _csv_rows((snapshot_run / "results.csv").read_text(encoding="utf-8"))
    _check_snapshot(SNAPSHOTS / "results.csv.json", {"columns": header, "rows": rows})


def test_the_snapshot_band_catches_a_moved_figure() -> None:
    """The band must not swallow a real change: a lost point of accuracy or a 20 % larger file."""
    row = {
        "accuracy": 0.9,
        "size_bytes": 1000,
        "macs": 10,
        "variant": "slim",
        "per_class_accuracy": {"0": 0.9},
    }
    assert _mismatches(row, {**row, "accuracy": 0.915, "size_bytes": 1050}, "r") == []
    assert len(_mismatches(row, {**row, "accuracy": 0.87, "size_bytes": 1200}, "r")) == 2
    assert _mismatches(row, {**row, "macs": 11}, "r") == ["r.macs: 11 != snapshot's 10"]
    assert _mismatches(row, {**row, "variant": "fat"}, "r")
    assert _mismatches(row, {k: v for k, v in row.items() if k != "macs"}, "r")


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


def test_report_built_from_recorded_inputs_matches_the_snapshot(request: pytest.FixtureRequest) -> None:
    if UPDATE:  # the run records new inputs first; otherwise the committed ones are all it needs
        request.getfixturevalue("snapshot_run")
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
