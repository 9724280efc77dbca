"""Quality gates over the benchmark table, and the comparison of two results files.

One package decides whether a number is good enough, so the ``gates`` stage (rules in the
pipeline YAML, checked after the benchmark) and ``python -m compress.check`` (a run against a
stored reference) compare numbers the same way, print the same table and write the same
JUnit XML. Both work on rows of the results table (one row per variant and runtime; its
columns and its kept predictions are in ``compress/results.py``).

Modules: ``numbers``, ``rules`` (the YAML schema), ``outcome`` (judging one number),
``evaluation`` (rules over a table), ``comparison`` (two tables), ``output`` (table, JUnit),
``chance`` (whether a variant learned anything: the report, the CLI and a gate share it), and
for ``compress.check``: ``reference_file`` (the committed reference, with predictions),
``pairing`` (which rows can be compared image by image) and ``drops`` (accuracy and class
drops). Paired figures (the drop's interval, flips, each class) come from
``compress.measure.paired``.
"""

from compress.gating.comparison import Thresholds, compare
from compress.gating.evaluation import PairedSource, evaluate
from compress.gating.numbers import number
from compress.gating.outcome import FAILED, PASSED, SKIPPED, Interval, Outcome, counts, judge
from compress.gating.output import format_table, junit_xml
from compress.gating.rules import EXPORT_RUNTIMES, RUNTIME_NAMES, SCRATCH_SUFFIX, GateRule, rule_ids, shipped

__all__ = [
    "EXPORT_RUNTIMES",
    "FAILED",
    "PASSED",
    "RUNTIME_NAMES",
    "SCRATCH_SUFFIX",
    "SKIPPED",
    "GateRule",
    "Interval",
    "Outcome",
    "PairedSource",
    "Thresholds",
    "compare",
    "counts",
    "evaluate",
    "format_table",
    "judge",
    "junit_xml",
    "number",
    "rule_ids",
    "shipped",
]
