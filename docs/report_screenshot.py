"""Screenshot the HTML report for the README: ``docs/img/report.png``.

Runs a small pipeline (``pipelines/ci-smoke.yaml`` by default) with its artifacts and reports in
a temporary directory, then opens ``reports/<pipeline>/latest.html`` in headless Chromium
(Debian's ``/usr/bin/chromium``, driven by Playwright; no browser is downloaded) and saves the
top of the page as a PNG. ``--reports DIR`` skips the run and uses a reports directory that
already holds the page.

    python docs/report_screenshot.py --data-root ../shared/datasets
    python docs/report_screenshot.py --reports /tmp/smoke/reports --name ci-smoke
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("COMPRESS_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def run_pipeline(pipeline: Path, work: Path, data_root: str | None) -> Path:
    """Run ``pipeline`` with its outputs under ``work``; return the reports directory."""
    reports = work / "reports"
    command = [
        sys.executable,
        "-m",
        "compress.run",
        str(pipeline.resolve()),
        "-q",
        "--artifacts",
        str(work / "artifacts"),
        "--reports",
        str(reports),
    ]
    if data_root:
        command += ["--data-root", str(Path(data_root).resolve())]
    print("running:", " ".join(command), flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code not in (0, 1):  # 1: a gate failed, and the report was still written
        raise SystemExit(f"the pipeline exited with {code}; no screenshot")
    return reports


def screenshot(html: Path, out: Path, width: int, height: int) -> None:
    """Save the top ``width`` x ``height`` pixels of ``html`` as a palette PNG."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    executable = CHROMIUM if Path(CHROMIUM).is_file() else None  # else Playwright's own browser
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=FLAGS,
            viewport={"width": width, "height": height},
            device_scale_factor=1,
        )
        try:
            page = context.new_page()
            page.goto(html.resolve().as_uri(), wait_until="load")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
            png = page.screenshot(full_page=False)
        finally:
            context.close()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    # a 256-colour palette keeps text sharp on a flat page and the file small
    image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pipeline", type=Path, default=ROOT / "pipelines" / "ci-smoke.yaml", help="the pipeline to run"
    )
    parser.add_argument("--reports", type=Path, help="use this reports directory instead of running")
    parser.add_argument(
        "--name",
        help="the pipeline's name under the reports directory "
        "(default: the pipeline's name: its YAML's name:, else the file's stem)",
    )
    parser.add_argument("--data-root", help="passed to compress.run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "report.png", help="the PNG")
    parser.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    parser.add_argument("--height", type=int, default=1600, help="pixels of the page kept, from the top")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    args = parser.parse_args(argv)

    name = args.name or yaml.safe_load(args.pipeline.read_text()).get("name") or args.pipeline.stem
    work = None
    reports = args.reports
    if reports is None:
        work = Path(tempfile.mkdtemp(prefix="report-screenshot-"))
        reports = run_pipeline(args.pipeline, work, args.data_root)
    try:
        html = reports / name / "latest.html"
        if not html.is_file():
            raise SystemExit(f"{html} not found (is --name the pipeline's name?)")
        screenshot(html, args.out, args.width, args.height)
    finally:
        if work is not None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif work is not None:
            print(f"kept {work}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) from {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
