"""The page dict as text: HTML (jinja2, ``templates/report.html.j2``) and Markdown (``summary.md``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from compress.gating.numbers import latency_batch_sizes
from compress.report.formatting import FORMATTERS

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


MARKDOWN_COLUMNS = ("variant", "runtime", "accuracy", "accuracy_delta_pp", "size_bytes", "size_ratio")


def render_markdown(page: dict[str, Any]) -> str:
    s = page["summary"]
    lines = [f"# {page['title']}", "", f"Run `{page['run_id']}`.", ""]
    alarm = s.get("at_chance")
    lines += [f"> ⚠ **{alarm}**", ""] if alarm else []
    lines += [f"**{s['headline']}**", ""] if s.get("headline") else []
    if s.get("baseline"):
        lines += [s["baseline"], ""]
    if s["recommendations"]:
        lines += [f"Within {s['tolerance_pp']:g} pp of the baseline's accuracy:", ""]
        labels = {"smallest": "Smallest", "fastest": "Fastest", "most_accurate": "Most accurate"}
        lines += [f"- **{labels[r['objective']]}:** {r['sentence']}" for r in s["recommendations"]]
        lines.append("")
    others = [w for w in page["warnings"] if w != alarm]  # the alarm is already at the top
    if others:
        lines += ["## Warnings", ""] + [f"- ⚠ {w}" for w in others] + [""]
    batches = latency_batch_sizes(page["results"])
    keys = list(MARKDOWN_COLUMNS)
    for b in batches:
        keys += [f"latency_b{b}_p50_ms", f"latency_ratio_b{b}"]
    keys.append("status")
    columns = [c for c in page["columns"] if c["key"] in keys]
    lines += ["## Results", ""]
    lines.append("| " + " | ".join(c["label"] for c in columns) + " |")
    lines.append("|" + "|".join("---" if c["kind"] == "text" else "---:" for c in columns) + "|")
    for row in page["results"]:
        cells = [FORMATTERS[c["kind"]](row.get(c["key"])).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios are against the baseline in the same runtime; lower is better for size and latency.",
        "",
    ]
    return "\n".join(lines)
