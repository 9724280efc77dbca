"""The pipeline YAML: its schema, loading, overrides and error messages.

Errors read like the YAML path the user has to edit
(``pipelines/x.yaml: stages[2] (prune).amount: ...``) because that is what they will search
for in their editor. The modules, by job:

- ``yaml_file``: reading the file safely (size, depth, aliases, duplicate keys);
- ``paths``: YAML paths such as ``stages[1].optimizer.lr`` and ``--set`` overrides;
- ``loader``: load + override + validate a whole pipeline, and the ``from:`` graph check;
- ``messages``: pydantic errors rewritten as YAML paths, did-you-mean;
- ``safety``: safe names, masked secrets, trusted model factories, project-relative files;
- ``schema``: the JSON Schema of a pipeline file, from the models (editors, ``compress.reference``);
- ``sections``, ``data``, ``model``, ``pipeline``: the schemas (stage-specific schemas live
  beside each stage and reach the loader as a registry, so this package never imports them).
"""

from compress.config.data import DataConfig
from compress.config.loader import load_pipeline, validate_pipeline
from compress.config.messages import did_you_mean, format_errors
from compress.config.model import ModelConfig
from compress.config.paths import apply_override, locate, split_path
from compress.config.pipeline import Pipeline, PipelineConfig, StageConfig
from compress.config.safety import import_factory, input_file, mask_secrets, safe_name
from compress.config.sections import (
    BN_ADAPT_BATCHES,
    MAX_BN_ADAPT_BATCHES,
    MAX_EPOCHS,
    OptimizerConfig,
    SoftLabels,
    StrictModel,
    TrainingConfig,
)
from compress.config.yaml_file import read_yaml

__all__ = [
    "BN_ADAPT_BATCHES",
    "MAX_BN_ADAPT_BATCHES",
    "MAX_EPOCHS",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Pipeline",
    "PipelineConfig",
    "SoftLabels",
    "StageConfig",
    "StrictModel",
    "TrainingConfig",
    "apply_override",
    "did_you_mean",
    "format_errors",
    "import_factory",
    "load_pipeline",
    "locate",
    "mask_secrets",
    "input_file",
    "read_yaml",
    "safe_name",
    "split_path",
    "validate_pipeline",
]
