"""How the CI regression check behaves on runs that differ only by chance, and on a hidden collapse.

    python -m compress.benchmarks.ci_noise [--seeds 1 2 3 4 5] [--work DIR] [--json FILE]
        [--set KEY=VALUE ...] [--max-drop PP] [--max-class-drop PP] [--decide MODE] [--confidence C]

runs ``pipelines/ci-smoke.yaml`` once per training seed (``--set seed=N``, each in its own
directory under ``--work``, default a temporary one; a seed whose results are already there is
reused, whatever the overrides) and checks each run against the committed reference
(``reports/baselines/ci-smoke.json``, written from a seed-0 run with ``--exclude student``)
with the overrides and flags ``.ci/run`` uses (the defaults below). Per seed it prints every
variant's accuracy drop with its interval, its worst class, its flip rate and whether
``python -m compress.check`` passed: a failure here is a false failure (nothing regressed, only
the seed changed).

Then the hidden collapse, on every seed's run: for each row and each class in turn, 8 % of that
class's test images (``--collapse``) that the row got right are predicted as the next class,
which costs the total accuracy under 1 pp. It is checked against the run itself (what CI sees
when the reference reproduces: the same seed on the same platform) and against the reference
(on top of the seed change); a collapse is caught when the check fails that row naming the
class. The closing lines give the largest number the seeds reached and the smallest a collapse
reached, so a class limit between the two passes every seed and fails every collapse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from compress.gating.comparison import Thresholds, compare_runs
from compress.gating.drops import Drop
from compress.gating.outcome import FAILED, Outcome
from compress.results import Predictions

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "ci-smoke.yaml"
REFERENCE = REPO / "reports" / "baselines" / "ci-smoke.json"
EXCLUDED = ("student",)  # .ci/run: the 2-epoch KD student swings by points between runs
# the flags .ci/run checks ci-smoke with (keep the two in step; docs/ci.md has the measurements)
CI_FLAGS = {"max_drop": 1.5, "max_class_drop": 5.0, "decide": "lower", "confidence": 0.95}
CI_SETS = ("data.limit_test=10000",)  # .ci/run measures on all 10,000 MNIST test images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compress.benchmarks.ci_noise", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="training seeds")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="the committed reference")
    parser.add_argument("--pipeline", type=Path, default=PIPELINE)
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help=f"an override for every run (default: {' '.join(CI_SETS)}, as .ci/run; repeatable)",
    )
    parser.add_argument("--max-drop", type=float, default=CI_FLAGS["max_drop"])
    parser.add_argument("--max-class-drop", type=float, default=CI_FLAGS["max_class_drop"])
    parser.add_argument("--decide", choices=("estimate", "lower", "upper"), default=CI_FLAGS["decide"])
    parser.add_argument("--confidence", type=float, default=CI_FLAGS["confidence"])
    parser.add_argument("--collapse", type=float, default=0.08, help="share of a class's images broken")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    return parser


def run_seed(seed: int, work: Path, pipeline: Path, overrides: list[str]) -> tuple[Path, int, float]:
    """The seed's results.json (reused when it is there), the run's exit code and its seconds."""
    root = work / f"seed-{seed}"
    results = root / "reports" / pipeline.stem / "results.json"
    if results.is_file():
        return results, 0, 0.0
    started = time.perf_counter()
    sets = [x for item in overrides for x in ("--set", item)]
    command = [sys.executable, "-m", "compress.run", str(pipeline), "--set", f"seed={seed}", *sets, "-q",
               "--artifacts", str(root / "artifacts"), "--reports", str(root / "reports")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=os.environ.copy())
    (root / "run.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if not results.is_file():
        raise SystemExit(
            f"seed {seed}: the run wrote no results.json (exit {done.returncode}); see {root}/run.log"
        )
    return results, done.returncode, time.perf_counter() - started


def check_cli(results: Path, args: argparse.Namespace) -> tuple[int, str]:
    """What CI runs: ``python -m compress.check`` with the flags; its exit code and output."""
    command = [sys.executable, "-m", "compress.check", str(results), "--baseline", str(args.reference),
               "--max-drop", str(args.max_drop), "--max-class-drop", str(args.max_class_drop),
               "--decide", args.decide, "--confidence", str(args.confidence),
               "--max-latency-ratio", "10"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def load(results: Path, reference: Path) -> tuple[list, Predictions | None, list, Predictions | None]:
    from compress.check import current_predictions, load_table

    current, then = load_table(results, "current"), load_table(reference, "reference")
    return (
        current.without(EXCLUDED),
        current.predictions or current_predictions(results),
        then.without(EXCLUDED),
        then.predictions,
    )


def _decided(change: Any, decide: str) -> float:
    """The number of a PairedStats or ClassChange that meets the limit under ``decide``."""
    return Drop(change.drop_pp, change.ci_low_pp, change.ci_high_pp).decided(decide)


def figures(current, now, reference, then, limits: Thresholds) -> list[dict[str, Any]]:
    """One line per compared row: drop and interval, worst class, flip rate, pass/fail."""
    result = compare_runs(current, reference, limits, now, then)
    failed = {(o.variant, o.runtime) for o in result.outcomes if o.status == FAILED}
    lines = []
    for (variant, runtime), stats in sorted(result.paired.items()):
        worst = stats.worst
        lines.append({
            "variant": variant, "runtime": runtime, "drop_pp": stats.drop_pp,
            "ci_low_pp": stats.ci_low_pp, "ci_high_pp": stats.ci_high_pp,
            "worst_class": stats.worst_class, "worst_drop_pp": worst.drop_pp if worst else None,
            "worst_ci_low_pp": worst.ci_low_pp if worst else None,
            "worst_ci_high_pp": worst.ci_high_pp if worst else None,
            "decided_pp": _decided(stats, limits.decide),
            "class_decided_max_pp": max(
                (_decided(c, limits.decide) for c in stats.classes.values()), default=None
            ),
            "flip_rate": stats.flip_rate, "fixed": stats.fixed, "broken": stats.broken,
            "passed": (variant, runtime) not in failed,
        })  # fmt: skip
    return lines


def collapse_class(
    rows: list[dict[str, Any]], store: Predictions, variant: str, runtime: str, index: int, fraction: float
) -> tuple[list[dict[str, Any]], Predictions]:
    """Copies of ``rows`` and ``store`` in which ``variant [runtime]`` predicts the next class for
    ``fraction`` of class ``index``'s images (the first ones it got right), its row's accuracy,
    correct count and per-class accuracy rewritten to match."""
    labels = np.asarray(store.labels, np.int64)
    predicted = np.asarray(store.get(variant, runtime), np.int64).copy()
    members = np.flatnonzero(labels == index)
    right = members[predicted[members] == index]
    broken = right[: int(round(fraction * len(members)))]
    predicted[broken] = (index + 1) % len(store.classes)
    changed = Predictions(store.labels, list(store.classes), store.fingerprint, dict(store.rows))
    changed.add(variant, runtime, predicted)
    out = []
    for row in rows:
        if (row["variant"], row["runtime"]) == (variant, runtime):
            hits = predicted == labels
            per_class = {name: float(hits[labels == i].mean()) if (labels == i).any() else None
                         for i, name in enumerate(store.classes)}  # fmt: skip
            present = [v for v in per_class.values() if v is not None]
            row = {**row, "accuracy": float(hits.mean()), "correct": int(hits.sum()),
                   "per_class_accuracy": per_class, "per_class_min_accuracy": min(present)}  # fmt: skip
        out.append(row)
    return out, changed


def _names(outcome: Outcome, variant: str, runtime: str, name: str) -> bool:
    """The outcome fails this row's class check naming the class."""
    same = (outcome.variant, outcome.runtime) == (variant, runtime)
    return (
        same and outcome.status == FAILED and outcome.gate == "class" and f"class {name!r}" in outcome.message
    )


def collapses(current, now, reference, then, limits: Thresholds, fraction: float) -> dict[str, Any]:
    """Every (row, class) collapse of one run, checked against the run itself (nothing else
    changed) and against the reference (on top of the seed change): how many fail naming the
    class, and the smallest number decided on for a collapsed class against the run itself."""
    found = {
        "own": 0,
        "reference": 0,
        "total": 0,
        "misses": [],
        "own_decided_min_pp": None,
        "max_total_drop_pp": 0.0,
    }
    for row in current:
        variant, runtime = row["variant"], row["runtime"]
        if now is None or now.get(variant, runtime) is None or row.get("status", "ok") != "ok":
            continue
        for index, name in enumerate(now.classes):
            rows, store = collapse_class(current, now, variant, runtime, index, fraction)
            changed = next(r for r in rows if (r["variant"], r["runtime"]) == (variant, runtime))
            cost = 100 * (row["accuracy"] - changed["accuracy"])
            found["max_total_drop_pp"] = max(found["max_total_drop_pp"], cost)
            own = compare_runs(rows, current, limits, store, now)
            decided = _decided(own.paired[(variant, runtime)].classes[name], limits.decide)
            low = found["own_decided_min_pp"]
            found["own_decided_min_pp"] = decided if low is None else min(low, decided)
            found["own"] += any(_names(o, variant, runtime, name) for o in own.outcomes)
            against = compare_runs(rows, reference, limits, store, then).outcomes
            hit = any(_names(o, variant, runtime, name) for o in against)
            found["reference"] += hit
            found["total"] += 1
            if not hit:
                found["misses"].append(f"{variant} [{runtime}] class {name!r}")
    return found


def print_seed(seed: int, code: int, lines: list[dict[str, Any]], hidden: dict[str, Any]) -> None:
    verdict = "pass" if code == 0 else f"FAIL (exit {code})"
    print(f"\nseed {seed}: compress.check {verdict}")
    print(f"  {'variant':<34} {'drop pp (CI)':<24} {'worst class drop pp (CI)':<36} {'flips':>6}  check")
    for x in lines:
        case = f"{x['variant']} [{x['runtime']}]"
        drop = f"{x['drop_pp']:+.1f} ({x['ci_low_pp']:+.1f} to {x['ci_high_pp']:+.1f})"
        worst = "-"
        if x["worst_class"] is not None:
            worst = (f"{x['worst_class']}: {x['worst_drop_pp']:+.1f} "
                     f"({x['worst_ci_low_pp']:+.1f} to {x['worst_ci_high_pp']:+.1f})")  # fmt: skip
        status = "pass" if x["passed"] else "FAIL"
        print(f"  {case:<34} {drop:<24} {worst:<36} {100 * x['flip_rate']:5.1f}%  {status}")
    n = hidden["total"]
    cost = hidden["max_total_drop_pp"]
    print(f"  hidden collapses (one class, total cost up to {cost:.1f} pp) caught: {hidden['own']}/{n} "
          f"against the run itself, {hidden['reference']}/{n} against the reference")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.set = list(CI_SETS) if args.set is None else args.set
    limits = Thresholds(args.max_drop, 1.10, 10.0, args.max_class_drop, args.decide, args.confidence)
    work = args.work or Path(tempfile.mkdtemp(prefix="ci-noise-"))
    sets = "".join(f" --set {x}" for x in args.set)
    print(f"{args.pipeline.name}{sets} against {args.reference}, runs in {work}")
    print(f"flags: --max-drop {args.max_drop:g} --max-class-drop {args.max_class_drop:g} "
          f"--decide {args.decide} --confidence {args.confidence:g}")  # fmt: skip
    summary = []
    for seed in args.seeds:
        results, run_code, seconds = run_seed(seed, work, args.pipeline, args.set)
        code, _ = check_cli(results, args)
        current, now, reference, then = load(results, args.reference)
        lines = figures(current, now, reference, then, limits)
        hidden = collapses(current, now, reference, then, limits, args.collapse)
        print_seed(seed, code, lines, hidden)
        summary.append({"seed": seed, "run_exit": run_code, "run_seconds": round(seconds, 1),
                        "check_exit": code, "rows": lines, "collapse": hidden})  # fmt: skip
    print_summary(summary, limits)
    if args.json:
        args.json.write_text(
            json.dumps({"flags": vars(limits), "seeds": summary}, indent=2, default=str) + "\n"
        )
    return 0


def print_summary(summary: list[dict[str, Any]], limits: Thresholds) -> None:
    rows = [x for s in summary for x in s["rows"]]
    failures = sum(s["check_exit"] != 0 for s in summary)
    own = sum(s["collapse"]["own"] for s in summary)
    against = sum(s["collapse"]["reference"] for s in summary)
    total = sum(s["collapse"]["total"] for s in summary)
    what = "estimate" if limits.decide == "estimate" else f"{limits.decide} end"
    accuracy = max((x["decided_pp"] for x in rows), default=float("nan"))
    classes = max((x["class_decided_max_pp"] or 0.0 for x in rows), default=float("nan"))
    collapsed = min((s["collapse"]["own_decided_min_pp"] for s in summary), default=float("nan"))
    print(f"\n{len(summary)} seed(s): {failures} false failure(s) of compress.check")
    print(f"hidden collapses caught: {own}/{total} against the run itself, {against}/{total} against the "
          "reference")  # fmt: skip
    print(f"seeds, largest accuracy drop ({what}): {accuracy:.2f} pp (limit {limits.max_drop:g})")
    print(f"seeds, largest class drop ({what}): {classes:.2f} pp (limit {limits.max_class_drop:g})")
    print(f"collapses against the run itself, smallest class drop ({what}): {collapsed:.2f} pp")
    if classes < collapsed:
        print(
            f"a class limit in [{classes:.2f}, {collapsed:.2f}) pp passes every seed and fails every collapse"
        )
    else:
        print("no class limit passes every seed and fails every collapse: the seeds move a class further")


if __name__ == "__main__":
    sys.exit(main())
