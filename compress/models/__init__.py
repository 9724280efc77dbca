"""Where models come from, and how they are saved without pickled code.

By job: ``zoo`` (LeNet-300-100, LeNet-5, ResNet-20, MLP), ``builders`` (any spec -> a module:
the zoo, torchvision and timm by name, a user's ``import_path`` factory; the adaptation of
ImageNet designs to the data), ``anatomy`` (finding a model's stem and classifier),
``weights`` (state dicts and checkpoints a user brings, pretrained weights), ``files``
(model files: save, load, resize pruned layers).
"""

from compress.models.anatomy import Anatomy, inspect
from compress.models.builders import build_model, forward_problem, size_problem
from compress.models.files import apply_state, is_model_payload, load_model, save_model
from compress.models.weights import load_checkpoint
from compress.models.zoo import ModelSpec

__all__ = [
    "Anatomy",
    "ModelSpec",
    "apply_state",
    "build_model",
    "forward_problem",
    "inspect",
    "is_model_payload",
    "load_checkpoint",
    "load_model",
    "save_model",
    "size_problem",
]
