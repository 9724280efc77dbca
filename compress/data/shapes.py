"""The input a dataset gives a model, known from the config alone (before any file is read).

Checks that must run at start-up, before anything trains (a structured-pruning MACs target the
architecture cannot reach), build the architecture with this shape. An image folder's own size
and classes are known only once it is scanned; without ``image_size`` the answer is None.
"""

from __future__ import annotations

from compress.config import DataConfig

# (channels, side, classes) of torchvision's datasets as read here
BUILTIN_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 10),
    "fashion_mnist": (1, 28, 10),
    "kmnist": (1, 28, 10),
    "emnist": (1, 28, 47),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "svhn": (3, 32, 10),
    "stl10": (3, 96, 10),
}
EMNIST_CLASSES = {"balanced": 47, "byclass": 62, "bymerge": 47, "digits": 10, "letters": 26, "mnist": 10}
FOLDER_CLASSES = 10  # a stand-in: only the classifier's width depends on it, and it is never pruned


def nominal_model_fields(spec: DataConfig) -> dict[str, int] | None:
    """``in_channels``, ``image_size`` and ``num_classes`` as a model builder takes them, or None
    for an image folder without ``image_size``."""
    channels, side, classes = BUILTIN_SHAPES.get(spec.dataset, (3, 0, FOLDER_CLASSES))
    if spec.dataset == "emnist":
        classes = EMNIST_CLASSES[spec.split_name()]
    side = spec.image_size or side
    if not side:
        return None
    return {"in_channels": spec.channels or channels, "image_size": side, "num_classes": classes}
