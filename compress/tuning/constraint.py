"""The tolerable loss (Intel Neural Compressor's accuracy criterion): how far a metric fell
below the reference, and whether that is within the tolerance. Both are the measuring package's
(``compress.measure.rules``), so a drop of exactly the tolerance meets it here as in the gates.
"""

from __future__ import annotations

from pydantic import Field

from compress.config import StrictModel
from compress.measure import rules


class ConstraintConfig(StrictModel):
    """The tolerable loss: ``metric`` may drop at most ``max_drop_pp`` below ``against``'s.

    Absolute: percentage points of a 0..1 metric (0.1 means 99.20% -> 99.10% is the limit).
    Relative: percent of the reference value (0.1 means 0.1% of it).
    """

    metric: str = Field(
        "val_accuracy", description="The metric that may drop, a metric of the target's variant."
    )
    max_drop_pp: float = Field(
        ge=0,
        le=100,
        description="Largest drop: percentage points of a 0..1 metric, or percent of the reference value "
        "when relative.",
    )
    relative: bool = Field(False, description="true: max_drop_pp is percent of the reference value.")
    against: str | None = Field(
        None, description="The reference variant; null: the target stage's first input."
    )
    # Short trials under-rate a setting, so a trial may drop this much more and still be a
    # candidate; ``confirm`` then re-checks candidates against max_drop_pp at full budget.
    trial_slack_pp: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Extra drop a short trial may have and still be a candidate (needs confirm).",
    )

    def excess(self, drop: float, slack: float = 0.0) -> float:
        """How far ``drop`` is past the tolerance (plus ``slack``); <= 0 meets it (Optuna's
        convention for constraints). Rounded like ``drop_pp``."""
        return rules.excess(drop, self.max_drop_pp + slack)


def drop_pp(reference: float, value: float, constraint: ConstraintConfig) -> float:
    """How far ``value`` is below ``reference``: percentage points, or percent of it when relative
    (``measure.rules.drop_pp``, so a drop of exactly the tolerance meets it)."""
    return rules.drop_pp(reference, value, relative=constraint.relative)
