"""The report: views over the one results table, rendered as an HTML page and ``summary.md``.

``inputs`` holds what the report is built from; ``formatting``, ``paired`` and ``table`` the
comparison table (with each drop's interval, the flips and the worst class); ``summary`` and
``alerts`` what a reader should know first (failed gates, then warnings); ``charts``,
``classes`` (per-class changes, the confusion change), ``study`` and ``distillation`` the
sections; ``previous`` and ``provenance`` the run's history; ``page``
assembles them into one dict and ``render`` writes it as HTML and Markdown.
"""

from compress.report.inputs import ReportInputs
from compress.report.page import build_page
from compress.report.render import render_html, render_markdown

__all__ = ["ReportInputs", "build_page", "render_html", "render_markdown"]
