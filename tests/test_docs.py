"""The documentation: the README stays a short front page whose examples run, and the MkDocs site
builds in strict mode (every page in the nav, every link inside the site resolving).

The README's pipelines are checked the way a reader would use them: saved to a file in an empty
directory and given to ``python -m compress.run FILE --validate``; a pipeline that starts from
``init: FILE`` gets a real state dict of the model it names.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250
# The commands .ci/run and new users depend on; the README must keep them as they are.
FRESH_MACHINE = (
    "pip install -e '.[edge]' && python -m compress.run pipelines/mnist.yaml --data-root ../shared/datasets",
    "pip install -e '.[dev,edge]' && COMPRESS_DATA_ROOT=../shared/datasets "
    "python -m pytest -q -n 2 --dist loadscope -rs",
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|(?:src|href)=\"([^\"]+)\"")
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)
# input shape of the zoo models per dataset, for an init file (in_channels, image_size, classes)
ZOO_SHAPES = {
    "mnist": (1, 28, 10),
    "fashion_mnist": (1, 28, 10),
    "kmnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
}


def _env() -> dict[str, str]:
    """The CLI from this checkout, whatever directory it runs in."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def _pipelines(markdown: Path) -> list[str]:
    """The YAML blocks of ``markdown`` that are whole pipelines (a mapping with ``stages``)."""
    blocks = []
    for block in YAML_BLOCK.findall(markdown.read_text(encoding="utf-8")):
        parsed = yaml.safe_load(block)
        if isinstance(parsed, dict) and "stages" in parsed:
            blocks.append(block)
    return blocks


def _write_init(path: Path, model: dict, data: dict) -> None:
    """A state dict of the model a train stage names, as a user would save it."""
    if "torchvision" in model:
        import torchvision

        # the classifier's width does not matter before the data is read (--validate reads none)
        net = torchvision.models.get_model(model["torchvision"], num_classes=10)
    else:
        from compress.models import build_model

        channels, size, classes = ZOO_SHAPES[data.get("dataset", "mnist")]
        spec = {"arch": model.get("arch", "lenet5"), "in_channels": channels, "image_size": size,
                "num_classes": classes, "width": model.get("width", 1.0)}  # fmt: skip
        net = build_model(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def _validate(block: str, where: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """``python -m compress.run example.yaml --validate`` in ``where``, in this process (a
    subprocess per block cost ~1 s of imports each): exit code, stdout, stderr."""
    from compress.run import main

    where.mkdir(parents=True)
    parsed = yaml.safe_load(block)
    for stage in parsed["stages"]:
        if isinstance(stage, dict) and stage.get("init"):
            _write_init(where / stage["init"], stage.get("model", {}), parsed.get("data", {}))
    (where / "example.yaml").write_text(block, encoding="utf-8")
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.chdir(where)
        code = main(["example.yaml", "--validate"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    text = "\n".join(lines)
    for command in FRESH_MACHINE:
        assert command in text, f"the README lost the command: {command}"
    assert "```mermaid\nflowchart" in text


def test_readme_pipelines_validate(tmp_path, monkeypatch, capsys):
    blocks = _pipelines(README)
    assert len(blocks) >= 2, "the README should show a pipeline and one that starts from init:"
    assert any("init:" in b and "epochs: 0" in b for b in blocks)
    for index, block in enumerate(blocks):
        code, out, err = _validate(block, tmp_path / f"readme-{index}", monkeypatch, capsys)
        assert code == 0, f"README pipeline {index} does not validate:\n{block}\n{err}"
        assert "is valid" in out


def test_docs_pipelines_validate(tmp_path, monkeypatch, capsys):
    pages = {page: _pipelines(page) for page in sorted(DOCS.rglob("*.md"))}
    checked = 0
    for page, blocks in pages.items():
        for index, block in enumerate(blocks):
            code, _out, err = _validate(block, tmp_path / f"{page.stem}-{index}", monkeypatch, capsys)
            where = f"{page.relative_to(REPO)}, pipeline {index}"
            assert code == 0, f"{where} does not validate:\n{block}\n{err}"
            checked += 1
    assert checked >= 2, "the getting-started and pipeline-files pages show whole pipelines"


def test_readme_links_stay_in_the_repository_and_resolve():
    text = README.read_text(encoding="utf-8")
    targets = [a or b for a, b in LINK.findall(text)]
    assert targets, "the README links to no docs page"
    for target in targets:
        assert "://" not in target and not target.startswith(("/", "mailto:")), f"link out: {target}"
        assert ".." not in Path(target).parts, f"link out of the repo: {target}"
        path = target.split("#", 1)[0]
        if path:
            assert (REPO / path).is_file(), f"README links to {target}, which does not exist"


def test_nothing_points_at_files_outside_the_repository():
    for page in [README, REPO / "CONTRIBUTING.md", *DOCS.rglob("*.md")]:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(REPO)
        assert "ARCHITECTURE.md" not in text, f"{name} names a file outside the repository"
        for target in (a or b for a, b in LINK.findall(text)):
            path = target.split("#", 1)[0]
            if path and "://" not in path:
                resolved = (page.parent / path).resolve()
                assert resolved.is_relative_to(REPO), f"{name} links out of the repository: {target}"


def test_every_cli_flag_is_documented():
    from compress.run import build_parser

    flags = {flag for action in build_parser()._actions for flag in action.option_strings} - {"-h", "--help"}
    assert {"--storage", "--worker", "--validate", "--set", "-q"} <= flags
    running = (DOCS / "running.md").read_text(encoding="utf-8")
    missing = sorted(flag for flag in flags if f"`{flag}" not in running)
    assert not missing, f"docs/running.md does not describe {missing}"


def test_report_screenshot_is_in_place():
    png = DOCS / "img" / "report.png"
    assert png.is_file(), "run: python docs/report_screenshot.py --data-root DATASETS"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(data) < 400_000
    width = int.from_bytes(data[16:20], "big")
    assert 1000 <= width <= 1600


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are not installed (pip install -e '.[dev]')",
)
def test_mkdocs_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, env={**_env(), "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "getting-started/index.html", "stages/tune/index.html", "running/index.html"):
        assert (site / page).is_file(), f"{page} was not built"
    contributing = (site / "contributing" / "index.html").read_text(encoding="utf-8")
    assert "duplicates --change" in contributing  # CONTRIBUTING.md, included through the snippet
