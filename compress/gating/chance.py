"""Whether a variant learned anything: its test accuracy against chance, its training loss against ln C.

A model that scores what guessing scores is no success however small or fast it is, and a
compression run that presents one as such (a green summary, a recommendation, a verified bundle)
misleads. One module decides it, so that the closing summary of ``compress.run``, the report's
warnings and recommendations, and the ``min_above_chance_pp`` gate always agree.

A variant is *at chance* when either

- one of its measured rows scores at most ``CHANCE_MARGIN_PP`` above chance (100 / C percent
  for C classes; a score below chance is no better than one at it), or
- a stage trained it with cross-entropy and no epoch's training loss fell below
  ``LOSS_STUCK_FRACTION`` x ln C (ln C is the loss of a uniform guess).

The number of classes comes from the row itself (the keys of ``per_class_accuracy``, one per
class of the data) or, for rows without it, from the run's other rows and variants.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from compress.gating.numbers import Row, number, passes

# 5 pp: the test splits here hold 500+ images, where the binomial spread of a guesser's accuracy
# is sqrt(0.1 * 0.9 / 500) = 1.3 pp at 10 classes, so 5 pp is about four spreads: a model that
# guesses does not clear it by luck, while a model that learned anything measurable clears it by
# far (one epoch of the tiny LeNet on 2,000 MNIST images scores ~89 %). It is absolute, not a
# share of chance: at 2 classes a 55 % model is as useless as a 50 % one.
CHANCE_MARGIN_PP = 5.0
# ln C is the cross-entropy of a uniform guess (2.30 at 10 classes). A model that learns leaves it
# within its first epoch (the tiny LeNet's first epoch averages ~0.5); one whose every epoch stays
# above 90 % of it (2.07) has not started. Label smoothing 0.1 floors the loss near 0.5 at 10
# classes, far below, so it does not trip this.
LOSS_STUCK_FRACTION = 0.9
# stages whose ``history`` holds cross-entropy on the labels. The distill stage's and QAT's
# losses may be distillation losses (a KL divergence scaled by T^2), which ln C does not bound.
CROSS_ENTROPY_STAGES = ("train", "prune")

ADVICE = (
    "Try more epochs, another learning rate (`optimizer.lr`), or starting from trained weights "
    "(`init:` or `model.weights`). BatchNorm running statistics are re-estimated on training images "
    "after training (`bn_adapt_batches`); if that is 0, a short training leaves them unsettled and "
    "evaluation, which uses them, scores chance."
)


@dataclass(frozen=True)
class AtChance:
    """One variant that learned nothing, with the numbers that show it."""

    variant: str
    num_classes: int
    accuracies: dict[str, float] = field(default_factory=dict)  # runtime -> accuracy at chance
    losses: tuple[float, ...] = ()  # its stage's per-epoch training losses, when stuck at ln C

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    def describe(self) -> str:
        """E.g. "`baseline` 11.35% (pytorch, onnxruntime)"; its loss when only the loss shows it."""
        if self.accuracies:
            shown: dict[str, list[str]] = {}
            for runtime, accuracy in self.accuracies.items():
                shown.setdefault(f"{100 * accuracy:.2f}%", []).append(runtime)
            text = "; ".join(f"{acc} ({', '.join(runtimes)})" for acc, runtimes in shown.items())
            return f"`{self.variant}` {text}"
        return f"`{self.variant}` (training loss {self.losses[-1]:.2f} at its last epoch)"


def row_num_classes(row: Row) -> int | None:
    """The classes a row was measured over: one ``per_class_accuracy`` key per class of the data."""
    given = row.get("num_classes")
    if isinstance(given, int) and not isinstance(given, bool) and given > 0:
        return given
    per_class = row.get("per_class_accuracy")
    if isinstance(per_class, str) and per_class.startswith("{"):  # results.csv keeps it as JSON
        try:
            per_class = json.loads(per_class)
        except ValueError:
            return None
    return len(per_class) if isinstance(per_class, dict) and per_class else None


def find_num_classes(rows: Iterable[Row], variants: Iterable[Any] = ()) -> int | None:
    """The run's number of classes (every variant sees the same data): from a row, else a variant."""
    for row in rows:
        found = row_num_classes(row)
        if found:
            return found
    for variant in variants:
        spec = (getattr(variant, "info", None) or {}).get("spec") or {}
        if isinstance(spec.get("num_classes"), int) and spec["num_classes"] > 0:
            return int(spec["num_classes"])
        found = row_num_classes(
            {"per_class_accuracy": (getattr(variant, "metrics", None) or {}).get("per_class_accuracy")}
        )
        if found:
            return found
    return None


def above_chance_pp(row: Row, num_classes: int | None = None) -> float | None:
    """Test accuracy minus chance, in percentage points; None when either is unknown."""
    accuracy = number(row.get("accuracy"))
    classes = row_num_classes(row) or num_classes
    if accuracy is None or not classes or classes < 2:
        return None
    return 100.0 * accuracy - 100.0 / classes


def loss_stuck(history: Iterable[dict[str, Any]], num_classes: int) -> tuple[float, ...] | None:
    """The epochs' training losses when none left ln C (non-finite ones never did); else None."""
    losses = [row.get("train_loss") for row in history if isinstance(row, dict) and "train_loss" in row]
    if not losses or num_classes < 2:
        return None
    limit = LOSS_STUCK_FRACTION * math.log(num_classes)
    finite = [number(loss) for loss in losses]
    if any(loss is not None and loss < limit for loss in finite):
        return None
    return tuple(math.nan if loss is None else loss for loss in finite)


def trained_histories(stages: Iterable[tuple[str, dict[str, Any], list[str]]]) -> dict[str, list[dict]]:
    """Variant name -> the epochs the stage that made it trained it for, with cross-entropy.

    ``stages`` gives each stage's kind, metrics and the names of the variants it made; a
    stage's ``history`` belongs to its variant only when it made exactly one.
    """
    found: dict[str, list[dict]] = {}
    for kind, metrics, names in stages:
        history = metrics.get("history") if isinstance(metrics, dict) else None
        if kind in CROSS_ENTROPY_STAGES and isinstance(history, list) and history and len(names) == 1:
            found[names[0]] = history
    return found


def at_chance(
    rows: Iterable[Row],
    histories: dict[str, list[dict]] | None = None,
    num_classes: int | None = None,
) -> list[AtChance]:
    """Every variant at chance, by its measured rows or its training loss, in table order.

    ``num_classes`` is the fallback for rows that do not carry their own (see
    :func:`row_num_classes`) and for the training losses.
    """
    rows = list(rows)
    classes = num_classes or find_num_classes(rows)
    flagged: dict[str, dict[str, float]] = {}
    order: list[str] = []
    row_classes: dict[str, int] = {}
    for row in rows:
        name = str(row.get("variant"))
        order.append(name)
        if row.get("status", "ok") != "ok":
            continue
        above = above_chance_pp(row, classes)
        if above is not None and passes(above, "<=", CHANCE_MARGIN_PP):  # 100 * 0.15 - 10 > 5.0
            flagged.setdefault(name, {})[str(row.get("runtime") or "?")] = float(row["accuracy"])
            row_classes[name] = row_num_classes(row) or int(classes or 0)
    stuck: dict[str, tuple[float, ...]] = {}
    for name, history in (histories or {}).items():
        losses = loss_stuck(history, classes) if classes else None
        if losses is not None:
            stuck[name] = losses
            order.append(name)
    found = []
    for name in dict.fromkeys(order):
        if name in flagged or name in stuck:
            found.append(
                AtChance(
                    name,
                    row_classes.get(name) or int(classes or 0),
                    flagged.get(name, {}),
                    stuck.get(name, ()),
                )
            )
    return found


def warning(found: list[AtChance]) -> str | None:
    """One warning for all variants at chance: who, how much, against what, and what to try."""
    if not found:
        return None
    classes = found[0].num_classes
    guess = f"guessing scores {100 / classes:.2f}% with {classes} classes"
    if len(found) == 1:
        one = found[0]
        within = f" and it scores at most {CHANCE_MARGIN_PP:g} pp above that" if one.accuracies else ""
        text = f"The variant {one.describe()} is at chance level: {guess}{within}"
    else:
        text = (
            f"These variants are at chance level ({guess}; each scores at most {CHANCE_MARGIN_PP:g} pp "
            f"above it, or its training loss never left ln({classes})): "
            + ", ".join(f.describe() for f in found)
        )
    stuck = [f for f in found if f.losses]
    if stuck:
        names = ", ".join(f"`{f.variant}`" for f in stuck)
        text += (
            f". The training loss of {names} never fell below {LOSS_STUCK_FRACTION:g} x ln({classes}) = "
            f"{LOSS_STUCK_FRACTION * math.log(classes):.2f} (last epoch {stuck[0].losses[-1]:.2f})"
        )
    pronoun = ("It", "it") if len(found) == 1 else ("They", "them")
    return f"{text}. {pronoun[0]} learned nothing: do not ship {pronoun[1]}. {ADVICE}"
