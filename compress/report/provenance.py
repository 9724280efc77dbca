"""Where the numbers come from: the run's facts, library versions, stage timings and config."""

from __future__ import annotations

from typing import Any

from compress.report.formatting import fmt_float, is_number
from compress.report.inputs import ReportInputs


def provenance(inputs: ReportInputs, rows: list[dict[str, Any]]) -> dict[str, Any]:
    m = inputs.manifest
    threads = sorted({int(r["threads"]) for r in rows if is_number(r.get("threads"))})
    cpu = next((r["cpu_model"] for r in rows if r.get("cpu_model")), None) or m.get("cpu_model")
    facts = [
        ("Pipeline", f"{m.get('pipeline', '?')} ({m.get('pipeline_file', '?')})"),
        ("Run id", m.get("run_id", "?")),
        ("Started", m.get("started", "?")),
        ("Command", m.get("command", "?")),
        ("Seed", m.get("seed", "?")),
        ("Device", f"{m.get('device', '?')} ({m.get('device_name', '?')})"),
        ("CPU model", cpu or "?"),
        ("Benchmark threads", ", ".join(map(str, threads)) or "–"),
        ("Torch threads at start", m.get("threads", "?")),
        ("Data", ", ".join(f"{k}={v}" for k, v in (m.get("data") or {}).items() if k != "download")),
        ("Results from", inputs.results_source),
    ]
    stages = [
        {
            "name": s.get("name"),
            "stage": s.get("stage"),
            "status": s.get("status"),
            "seconds": fmt_float(s.get("seconds"), 2),
            "key": str(s.get("cache_key", ""))[:16],
        }
        for s in m.get("stages", [])
    ]
    hits = sum(1 for s in stages if s["status"] == "cached")
    return {
        "facts": [{"name": k, "value": str(v)} for k, v in facts],
        "versions": [{"name": k, "value": v} for k, v in (m.get("versions") or {}).items()],
        "stages": stages,
        "cache_hits": f"{hits} of {len(stages)} earlier stage(s) reused from the cache",
        "yaml": inputs.resolved_yaml,
    }
