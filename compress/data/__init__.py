"""Where images come from, and how stages get them.

By job: ``root`` (the data root's precedence and the user cache), ``builtin`` (torchvision's
datasets by name), ``folder`` (ImageFolder trees: scan, check, decode), ``images`` (decoding
and shaping one image, images on disk), ``fingerprint`` (what the data is, for the stage
cache), ``source`` (finding and checking the data before a run), ``load`` (the seeded
train/val/test split and statistics), ``bundle`` (what stages hold), ``batches`` (batches,
augmentation, calibration images), ``shapes`` (the input a dataset gives a model, from the
config alone).
"""

from compress.data.batches import calibration_images, iterate_batches
from compress.data.builtin import IDX_FILES
from compress.data.bundle import DataBundle, Split
from compress.data.load import STATS, clear_caches, load_data
from compress.data.root import cache_dir, default_root, resolve_root
from compress.data.shapes import nominal_model_fields
from compress.data.source import DataSource, prepare

__all__ = [
    "IDX_FILES",
    "STATS",
    "DataBundle",
    "DataSource",
    "Split",
    "cache_dir",
    "calibration_images",
    "clear_caches",
    "default_root",
    "iterate_batches",
    "load_data",
    "nominal_model_fields",
    "prepare",
    "resolve_root",
]
