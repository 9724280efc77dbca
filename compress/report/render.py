"""The page dict as text: HTML (jinja2, ``templates/report.html.j2``) and Markdown (``summary.md``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from compress.gating.numbers import latency_batch_sizes
from compress.report.table import cell_text

TEMPLATES = Path(__file__).parent.parent / "templates"


def code_spans(text: str) -> markupsafe.Markup:
    """Escape ``text`` and turn `backticks` into <code> elements."""
    escaped = str(markupsafe.escape(text))
    return markupsafe.Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["code"] = code_spans
    return env


def render_html(page: dict[str, Any]) -> str:
    return environment().get_template("report.html.j2").render(page=page)


MARKDOWN_COLUMNS = (
    "variant",
    "runtime",
    "accuracy",
    "accuracy_delta_pp",
    "flip_rate",
    "worst_class_drop_pp",
    "size_bytes",
    "size_ratio",
)


def render_markdown(page: dict[str, Any]) -> str:
    """summary.md: the failed gates first, then the warnings, then the summary and the table."""
    lines = [f"# {page['title']}", "", f"Run `{page['run_id']}`.{_gates_passed(page.get('gates'))}", ""]
    lines += _markdown_failures(page.get("gates"))
    lines += _markdown_warnings(page, bool(lines[4:]))
    lines += _markdown_summary(page)
    lines += _markdown_table(page)
    return "\n".join(lines)


def _gates_passed(gates: dict[str, Any] | None) -> str:
    if not gates or gates["failed"]:
        return ""
    skipped = f", {gates['skipped']} skipped" if gates["skipped"] else ""
    return f" Quality gates: {gates['passed']} passed, 0 failed{skipped}."


def _markdown_failures(gates: dict[str, Any] | None) -> list[str]:
    if not gates or not gates["failed"]:
        return []
    lines = ["## Failed gates", ""]
    lines += [
        f"{gates['failed']} of {gates['total']} quality gates failed "
        f"({gates['passed']} passed, {gates['skipped']} skipped):",
        "",
    ]
    return lines + [f"- ❌ {text}" for text in gates["failures"]] + [""]


def _markdown_warnings(page: dict[str, Any], after_failures: bool) -> list[str]:
    """The chance alarm (bold, first) and the other warnings, under a heading of their own."""
    alarm = page["summary"].get("at_chance")
    others = [w for w in page["warnings"] if w != alarm]  # the alarm is shown once, first
    if not alarm and not others:
        return []
    lines = ["## Warnings", ""] if after_failures else []
    lines += [f"> ⚠ **{alarm}**", ""] if alarm else []
    if others:
        lines += [] if after_failures else ["## Warnings", ""]
        lines += [f"- ⚠ {w}" for w in others] + [""]
    return lines


def _markdown_summary(page: dict[str, Any]) -> list[str]:
    s = page["summary"]
    lines = ["## Summary", ""]
    lines += [f"**{s['headline']}**", ""] if s.get("headline") else []
    if s.get("baseline"):
        lines += [s["baseline"], ""]
    if s["recommendations"]:
        lines += [f"Within {s['tolerance_pp']:g} pp of the baseline's accuracy:", ""]
        lines += [f"- **{r['label']}:** {r['sentence']}" for r in s["recommendations"]]
        lines.append("")
    confusion = page.get("confusion")
    if confusion and not confusion.get("missing"):
        lines += [confusion["sentence"], ""]
    return lines


def _markdown_table(page: dict[str, Any]) -> list[str]:
    batches = latency_batch_sizes(page["results"])
    keys = list(MARKDOWN_COLUMNS)
    for b in batches:
        keys += [f"latency_b{b}_p50_ms", f"latency_ratio_b{b}"]
    keys.append("status")
    columns = [c for c in page["columns"] if c["key"] in keys]
    lines = ["## Results", ""]
    lines.append("| " + " | ".join(c["label"] for c in columns) + " |")
    lines.append("|" + "|".join("---" if c["kind"] == "text" else "---:" for c in columns) + "|")
    for row in page["results"]:
        cells = [cell_text(row, c).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios are against the baseline in the same runtime; lower is better for size and latency."
        + (
            " Intervals are on the accuracy change against the baseline's predictions on the same images."
            if any(c["key"] == "flip_rate" for c in columns)
            else ""
        ),
        "",
    ]
    return lines
