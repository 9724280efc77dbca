"""The tuning mechanics below the ``tune`` stage: the search space, the study on its storage,
the objective, full-budget confirmation, selection and summaries, one module each.

It never imports the stages or the engine, so both may import it; the names below are the
ones they use.
"""

from compress.config import mask_secrets
from compress.tuning.guard import TuningBundle
from compress.tuning.settings import with_settings
from compress.tuning.storage import with_storage

__all__ = ["TuningBundle", "mask_secrets", "with_settings", "with_storage"]
