"""Open a local HTML file in headless Debian Chromium (driven by Playwright) and report what happened.

No browser is downloaded: Playwright's Python package drives ``/usr/bin/chromium`` (Debian's
``chromium`` package; ``.ci/run`` installs it). Each call uses a fresh profile directory.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("COMPRESS_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class BrowserUnavailable(RuntimeError):
    """Chromium or the Playwright package is missing, or the browser would not start."""


@dataclass
class PageVisit:
    url: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every request the page made (data: URIs excluded)
    images: list[dict[str, Any]] = field(default_factory=list)
    svg_elements: int = 0
    table_variants: list[str] = field(default_factory=list)
    sorted_accuracy: list[float] = field(default_factory=list)  # accuracy column after clicking its header
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> rendered height, visible text
    load_ms: float = 0.0  # navigation start -> load event end (Performance API)
    wall_ms: float = 0.0  # page.goto(..., wait_until="load") as seen from Python
    bytes: int = 0


def visit(html: Path, screenshot: Path, profile: Path) -> PageVisit:
    """Load ``html`` from disk, wait for every image, click-sort the table and take a screenshot."""
    if not Path(CHROMIUM).is_file() and shutil.which(CHROMIUM) is None:
        raise BrowserUnavailable(f"{CHROMIUM} not found; install Debian's chromium package")
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BrowserUnavailable(f"the playwright package is not installed ({exc})") from None

    url = Path(html).resolve().as_uri()
    result = PageVisit(url=url, bytes=Path(html).stat().st_size)
    with sync_playwright() as pw:
        try:
            context = pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": 1400, "height": 900},
            )
        except PlaywrightError as exc:
            raise BrowserUnavailable(f"chromium did not start: {str(exc).splitlines()[0]}") from None
        try:
            page = context.new_page()
            page.on("console", lambda m: result.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: result.page_errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith("data:") else result.requests.append(r.url))
            tic = time.perf_counter()
            page.goto(url, wait_until="load")
            result.wall_ms = 1000 * (time.perf_counter() - tic)
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
            facts = page.evaluate(
                """() => ({
                    images: Array.from(document.images).map(i => ({
                        alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
                        data_uri: i.src.startsWith("data:")})),
                    svgs: document.querySelectorAll("svg").length,
                    variants: Array.from(document.querySelectorAll(
                        '#results tbody td[data-col="variant"]')).map(td => td.dataset.v),
                    load: performance.getEntriesByType("navigation")[0].loadEventEnd,
                    sections: Object.fromEntries(Array.from(document.querySelectorAll("section[id]")).map(
                        s => [s.id, {height: s.getBoundingClientRect().height, text: s.innerText}])),
                })"""
            )
            result.images = facts["images"]
            result.svg_elements = facts["svgs"]
            result.table_variants = facts["variants"]
            result.load_ms = float(facts["load"])
            result.sections = facts["sections"]
            header = page.locator('#results th[data-col="accuracy"]')
            if header.count():
                header.click()
                result.sorted_accuracy = page.evaluate(
                    """() => Array.from(document.querySelectorAll('#results tbody td[data-col="accuracy"]'))
                        .map(td => td.dataset.v).filter(v => v !== "").map(Number)"""
                )
                header.click()  # back to the descending order a reader expects first
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    return result
