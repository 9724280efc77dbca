"""Runs a pipeline: orders its stages, caches their outputs, writes the run directory.

``runner`` orders and runs the stages, ``cache`` keys, locks, commits and reuses their
outputs, ``rundir`` writes the run directory (log, manifest, links, published reports),
``execute`` runs one stage and classifies what it raises, ``trials`` runs a stage as a tuning
trial for the tune stage, and ``records`` holds the types they share.
"""

from compress.engine.records import RunOptions, RunSummary, StageFailed, StageRecord
from compress.engine.runner import resolve_device, run_pipeline

__all__ = ["RunOptions", "RunSummary", "StageFailed", "StageRecord", "resolve_device", "run_pipeline"]
