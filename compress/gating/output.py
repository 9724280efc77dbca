"""How outcomes are shown: the fixed-width pass/fail table and JUnit XML for CI."""

from __future__ import annotations

import platform
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import Any

from compress.gating.outcome import FAILED, PASSED, SKIPPED, Outcome, counts


def format_table(outcomes: list[Outcome], title: str = "gates") -> str:
    """A fixed-width pass/fail table, failures first, then a count line."""
    if not outcomes:
        return f"{title}: nothing evaluated"
    order = {FAILED: 0, SKIPPED: 1, PASSED: 2}
    rows = sorted(outcomes, key=lambda o: order.get(o.status, 3))
    gate_w = min(32, max(len(o.gate) for o in rows))
    case_w = min(44, max(len(o.case) for o in rows))
    lines = [f"{title}:"]
    for o in rows:
        mark = {FAILED: "FAIL", PASSED: "pass", SKIPPED: "skip"}.get(o.status, o.status)
        lines.append(f"  {mark:<4}  {o.gate:<{gate_w}}  {o.case:<{case_w}}  {o.message}")
    c = counts(outcomes)
    lines.append(f"{title}: {c[PASSED]} passed, {c[FAILED]} failed, {c[SKIPPED]} skipped")
    return "\n".join(lines)


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
