"""How outcomes are shown: the fixed-width pass/fail table and JUnit XML for CI."""

from __future__ import annotations

import platform
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import Any

from compress.gating.outcome import FAILED, PASSED, SKIPPED, Outcome, counts


def format_table(outcomes: list[Outcome], title: str = "gates", list_passed: bool = True) -> str:
    """A fixed-width pass/fail table, failures first, then a count line.

    ``list_passed=False`` (the closing lines of a run): one count line, then only the failures, one
    line each, and the skipped gates, one line per gate and reason; a green run prints only the
    count line.
    """
    if not outcomes:
        return f"{title}: nothing evaluated"
    c = counts(outcomes)
    tally = f"{title}: {c[PASSED]} passed, {c[FAILED]} failed, {c[SKIPPED]} skipped"
    if not list_passed:
        return "\n".join([tally, *_rows([o for o in outcomes if o.status == FAILED]), *_skipped(outcomes)])
    order = {FAILED: 0, SKIPPED: 1, PASSED: 2}
    rows = sorted(outcomes, key=lambda o: order.get(o.status, 3))
    return "\n".join([f"{title}:", *_rows(rows), tally])


def _rows(outcomes: list[Outcome]) -> list[str]:
    """One fixed-width line per outcome: mark, gate, 'variant [runtime]', message."""
    if not outcomes:
        return []
    gate_w = min(32, max(len(o.gate) for o in outcomes))
    case_w = min(44, max(len(o.case) for o in outcomes))
    lines = []
    for o in outcomes:
        mark = {FAILED: "FAIL", PASSED: "pass", SKIPPED: "skip"}.get(o.status, o.status)
        lines.append(f"  {mark:<4}  {o.gate:<{gate_w}}  {o.case:<{case_w}}  {o.message}")
    return lines


def _skipped(outcomes: list[Outcome]) -> list[str]:
    """The skipped outcomes in brief: one line per gate and reason, with how many rows."""
    groups: dict[tuple[str, str], int] = {}
    for o in outcomes:
        if o.status == SKIPPED:
            groups[(o.gate, o.message)] = groups.get((o.gate, o.message), 0) + 1
    return [
        f"  skip  {gate}: {message} ({n} row{'s' if n != 1 else ''})" for (gate, message), n in groups.items()
    ]


def junit_xml(outcomes: list[Outcome], suite: str, properties: dict[str, Any] | None = None) -> bytes:
    """JUnit XML: one <testcase> per outcome (classname = suite.gate, name = 'variant [runtime]')."""
    c = counts(outcomes)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    root = ET.Element(
        "testsuites", name=suite, tests=str(c["total"]), failures=str(c[FAILED]), errors="0", time="0"
    )
    element = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(c["total"]),
        failures=str(c[FAILED]),
        errors="0",
        skipped=str(c[SKIPPED]),
        time="0",
        timestamp=stamp,
        hostname=platform.node() or "localhost",
    )
    if properties:
        props = ET.SubElement(element, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", name=str(key), value="" if value is None else str(value))
    for o in outcomes:
        case = ET.SubElement(element, "testcase", classname=f"{suite}.{o.gate}", name=o.case, time="0")
        detail = (
            f"gate: {o.gate} ({o.metric})\nvariant: {o.variant}\nruntime: {o.runtime}\n"
            f"measured: {o.value}\nthreshold: {o.op or ''} {o.threshold}\n"
            + (f"against: {o.against}\n" if o.against else "")
            + f"{o.message}\n"
        )
        if o.status == FAILED:
            ET.SubElement(case, "failure", message=f"{o.case}: {o.message}", type=o.metric).text = detail
        elif o.status == SKIPPED:
            ET.SubElement(case, "skipped", message=o.message)
        else:
            ET.SubElement(case, "system-out").text = detail
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
