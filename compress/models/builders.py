"""Building a model from its spec: the zoo, torchvision or timm by name, or a user's factory.

The spec (``ModelConfig.spec()`` plus the data's ``in_channels``, ``image_size`` and
``num_classes``) is saved in every model file, so this one function also rebuilds any saved
model; pretrained weights are read only when a training stage builds a fresh model.

torchvision and timm architectures are ImageNet designs, adapted to the data the same way
every time (the rule is part of the spec, so a saved model rebuilds identically):

- the first convolution takes the data's channel count (pretrained RGB kernels are summed for
  grayscale; timm adapts its own through ``in_chans``);
- for images of at most 64 px (or ``model.small_stem: true``) the first convolution runs at
  stride 1 if it had stride 2, and a max-pool between it and the next convolution is removed,
  as in the CIFAR variants of these networks (a 32 px image would otherwise be 8x8 after the
  stem); patchifying stems (ViT, ConvNeXt: stride = kernel >= 4) are left as they are;
- the classifier has one output per class of the data (pretrained classifiers are dropped).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compress.config import import_factory, project_file
from compress.errors import ArtifactError
from compress.models import weights as user_weights
from compress.models.anatomy import inspect, replace_module
from compress.models.zoo import ZOO, ModelSpec

log = logging.getLogger("compress")
SMALL_IMAGE = 64


def build_model(spec: ModelSpec, pretrained: bool = False) -> nn.Module:
    """Instantiate the architecture ``spec`` names; ``pretrained`` loads ``spec["weights"]``.

    ``arch: custom`` calls the ``import_path`` factory, but only one that a pipeline validated
    in this process names (``model.import_path``, trusted code): a model file cannot make us
    import anything on its own.
    """
    arch = spec.get("arch")
    if arch == "custom":
        return _build_custom(spec)
    if arch == "torchvision":
        return _torchvision(spec, pretrained)
    if arch == "timm":
        return _timm(spec, pretrained)
    if arch not in ZOO:
        raise ArtifactError(
            f"unknown model architecture {arch!r}; known: {', '.join(ZOO)}, torchvision, timm"
        )
    try:
        return ZOO[arch](spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"model spec for {arch!r} is incomplete or invalid ({type(exc).__name__}: {exc})"
        ) from None


def _build_custom(spec: ModelSpec) -> nn.Module:
    path = spec.get("import_path")
    try:
        factory = import_factory(str(path))
    except PermissionError:
        raise ArtifactError(
            f"the model needs code from {path!r}, which no pipeline run here names in model.import_path; "
            "refusing to import it (name it in the pipeline's model.import_path if you trust that code)"
        ) from None
    except ValueError as exc:
        raise ArtifactError(f"model.import_path: {exc}") from None
    model = factory(dict(spec))
    if not isinstance(model, nn.Module):
        raise ArtifactError(
            f"model.import_path: {path} returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


# ------------------------------------------------------------------ torchvision


def torchvision_names() -> list[str]:
    """torchvision's classification builders (detection, segmentation and video models are not)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision(spec: ModelSpec, pretrained: bool) -> nn.Module:
    import torchvision

    name = spec.get("torchvision")
    if name not in torchvision_names():
        raise ArtifactError(f"torchvision has no classification model {name!r}")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=int(spec["num_classes"]))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"torchvision {name}: {exc}") from None
    state = _pretrained_state(spec) if pretrained and spec.get("weights") else None
    _adapt(model, spec, state)
    return model


def _pretrained_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The weights ``model.weights`` names: a local file, or a torchvision weights name (which
    torchvision fetches into its hub cache, or finds there when offline)."""
    source = str(spec["weights"])
    if user_weights.ENUM_NAME.fullmatch(source):
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(spec["torchvision"])
            entry = enum.DEFAULT if source == "DEFAULT" else enum[source]
        except (KeyError, ValueError):
            raise ArtifactError(
                f"model.weights: torchvision has no weights {source!r} for {spec['torchvision']}"
            ) from None
        try:
            return entry.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # URLError offline, HTTP errors, a hash mismatch
            raise ArtifactError(
                f"model.weights: {source} for {spec['torchvision']} must come from {entry.url} and is not in "
                f"torch's hub cache; the download failed ({type(exc).__name__}: {exc}). Download the file "
                "where there is internet, put it in the project and give model.weights: PATH"
            ) from None
    payload = user_weights.load_checkpoint(project_file(source, "model.weights"))
    found = user_weights.state_dict_in(payload)
    if found is None:
        raise ArtifactError(f"model.weights: {source} holds no state dict of tensors")
    return found[0]


def _adapt(model: nn.Module, spec: ModelSpec, state: dict[str, torch.Tensor] | None) -> None:
    """Data channels, small-image stem and pretrained weights, by the rule in the module docstring."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        if state is not None:
            user_weights.load_pretrained(model, state, set())
        return
    anatomy = _anatomy(model, first.in_channels, spec)
    channels = int(spec["in_channels"])
    keep_out = {anatomy.classifier} if anatomy.classifier else set()
    if anatomy.stem is not None and first.in_channels != channels:
        keep_out.add(anatomy.stem)
    if state is not None:
        try:
            user_weights.load_pretrained(model, state, keep_out)
        except ValueError as exc:
            raise ArtifactError(f"model.weights: {exc}") from None
    if anatomy.stem is not None:
        stem = model.get_submodule(anatomy.stem)
        if stem.in_channels != channels:
            replace_module(model, anatomy.stem, _with_channels(stem, channels, state, anatomy.stem))
            stem = model.get_submodule(anatomy.stem)
        if small_stem(spec) and tuple(stem.stride) == (2, 2) and tuple(stem.kernel_size) != (2, 2):
            stem.stride = (1, 1)
            if anatomy.stem_pool is not None:
                replace_module(model, anatomy.stem_pool, nn.Identity())


def small_stem(spec: ModelSpec) -> bool:
    """The small-image rule: ``model.small_stem`` if given, else images of at most 64 px."""
    wanted = spec.get("small_stem")
    return bool(wanted) if wanted is not None else int(spec["image_size"]) <= SMALL_IMAGE


def _anatomy(model: nn.Module, stem_channels: int, spec: ModelSpec) -> Any:
    size = int(spec["image_size"])
    for side in dict.fromkeys((size, 224)):
        try:
            return inspect(model, torch.zeros(1, stem_channels, side, side), int(spec["num_classes"]))
        except (RuntimeError, ValueError, AssertionError):
            continue
    raise ArtifactError(
        f"{spec.get('torchvision') or spec.get('timm')}: cannot run on {stem_channels}x{size}x{size} images "
        "(some architectures need a fixed size, e.g. ViT 224 px, Inception 299 px: set data.image_size)"
    )


def _with_channels(conv: nn.Conv2d, channels: int, state: dict | None, name: str) -> nn.Conv2d:
    if conv.groups != 1:
        raise ArtifactError(f"the first convolution {name} is grouped; cannot change its input channels")
    new = nn.Conv2d(
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )  # fmt: skip
    with torch.no_grad():
        if state is not None and f"{name}.weight" in state:
            new.weight.copy_(user_weights.adapt_input_channels(state[f"{name}.weight"], channels))
            if conv.bias is not None and f"{name}.bias" in state:
                new.bias.copy_(state[f"{name}.bias"])
        else:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


# ------------------------------------------------------------------ timm


def timm_module() -> Any:
    """timm, an optional extra: ``pip install -e '.[timm]'``."""
    try:
        import timm
    except ImportError:
        raise ArtifactError(
            "model.timm needs the timm package, an optional extra: pip install -e '.[timm]'"
        ) from None
    return timm


def _timm(spec: ModelSpec, pretrained: bool) -> nn.Module:
    timm = timm_module()
    name = spec.get("timm")
    if not timm.is_model(name):
        raise ArtifactError(f"timm has no model {name!r}")
    options: dict[str, Any] = {"num_classes": int(spec["num_classes"]), "in_chans": int(spec["in_channels"])}
    if pretrained and spec.get("weights"):  # timm adapts the classifier and input channels itself
        path = project_file(str(spec["weights"]), "model.weights")
        options.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:
        model = timm.create_model(name, **options)
    except Exception as exc:  # timm raises RuntimeError/ValueError/KeyError for bad files and names
        raise ArtifactError(f"timm {name}: {type(exc).__name__}: {str(exc)[:300]}") from None
    _adapt(model, spec, None)
    return model
