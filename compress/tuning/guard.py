"""The test-split guard: tuning scores must come from validation data, so inside a trial the
test split is not there to read, and a stage that forgets to skip it fails loudly.
"""

from __future__ import annotations

from dataclasses import fields

from compress.data import DataBundle, Split


class TuningTestReadError(RuntimeError):
    """A stage read the test split inside a tuning trial: scores must come from validation."""


class TuningBundle(DataBundle):
    """The dataset as trials see it: ``.test`` raises, so a stage that forgets to skip its
    test evaluation during tuning (``ctx.tuning``) fails loudly instead of leaking test data."""

    @property
    def test(self) -> Split:  # type: ignore[override]
        raise TuningTestReadError(
            "the test split was read during a tuning trial; stages must skip test evaluation "
            "when ctx.tuning is true (tuning scores use the validation split only)"
        )

    @classmethod
    def wrap(cls, bundle: DataBundle) -> TuningBundle:
        return cls(**{f.name: getattr(bundle, f.name) for f in fields(DataBundle)})
