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

import functools
import json
import logging
from typing import Any

import torch
from torch import nn

from compress.config import import_factory, input_file
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


# builders whose training-mode forward returns a namedtuple with auxiliary classifiers' logits
# (Szegedy et al.'s deep supervision): built without them, so training sees plain logits and the
# shipped model is the main classifier alone (pretrained weights of the aux heads are not loaded)
AUXILIARY_HEADS = frozenset({"googlenet", "inception_v3"})


def _torchvision(spec: ModelSpec, pretrained: bool) -> nn.Module:
    import torchvision

    name = spec.get("torchvision")
    if name not in torchvision_names():
        raise ArtifactError(f"torchvision has no classification model {name!r}")
    kwargs = {"weights": None, "num_classes": int(spec["num_classes"])}
    if name in AUXILIARY_HEADS:
        kwargs["aux_logits"] = False
    try:
        model = torchvision.models.get_model(name, **kwargs)
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
                "where there is internet and give model.weights: PATH (any readable path)"
            ) from None
    payload = user_weights.load_checkpoint(input_file(source, "model.weights"))
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


# what a forward pass raises when a feature map is too small or not the size a layer expects
RUN_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError)
TRIED_SIDES = (48, 64, 96, 128, 160, 224, 299, 384, 512)


def forward_problem(model: nn.Module, example: torch.Tensor) -> str | None:
    """Why ``model`` cannot take ``example`` (torch's reason on one line), or None if it can; run
    in eval mode, the model's mode is restored."""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    except RUN_ERRORS as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first[:200]}"
    finally:
        model.train(training)
    return None


def size_problem(spec: ModelSpec) -> str | None:
    """``_size_problem`` for a spec, remembered: the loader checks a pipeline more than once."""
    return _size_problem(json.dumps(spec, sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _size_problem(spec_json: str) -> str | None:
    """Why the model of ``spec`` cannot run on its data's images, and what to do, in one line; None
    if it runs.

    Many ImageNet designs shrink a 32 px image to nothing (AlexNet's pools, Inception's
    stride-2 stem) or need a fixed size (ViT's position embedding, MaxViT's windows). Found
    here, before any data is read, the pipeline is refused with the smallest size that works
    instead of failing in the train stage's first batch. Each size is tried on a model built
    for it, since the small-image rule changes the stem with the size.
    """
    spec = json.loads(spec_json)
    side = int(spec["image_size"])
    built: dict[object, nn.Module | str] = {}
    problem = _problem_at(spec, side, built)
    if problem is None:
        return None
    if small_stem(spec) and _problem_at({**spec, "small_stem": False}, side, {}) is None:
        return (
            f"{model_label(spec)} cannot run on {side} px images with the small-image stem ({problem}); "
            "set model.small_stem: false (its stem has more than one stride-2 branch), or choose another "
            "model"
        )
    works = next((s for s in TRIED_SIDES if s > side and _problem_at(spec, s, built) is None), None)
    hint = (
        f"the smallest size tried that works is {works} px: set data.image_size: {works}"
        if works
        else f"no size up to {TRIED_SIDES[-1]} px worked"
    )
    channels = int(spec["in_channels"])
    return (
        f"{model_label(spec)} cannot run on {channels}x{side}x{side} images ({problem}); {hint}, "
        "or choose another model"
    )


def model_label(spec: ModelSpec) -> str:
    """'torchvision alexnet', 'timm resnet18', a user's import path, or the zoo name."""
    arch = spec.get("arch")
    if arch in ("torchvision", "timm"):
        return f"{arch} {spec.get(arch)}"
    return str(spec.get("import_path") if arch == "custom" else arch)


def _problem_at(spec: ModelSpec, side: int, built: dict[object, nn.Module | str]) -> str | None:
    """``forward_problem`` at ``side`` px. A torchvision or timm model depends on the size only
    through the small-image rule, so ``built`` keeps one model per rule (a ViT-B builds twice,
    not once per size); a user's factory may read the size, so it is built for each."""
    sized = {**spec, "image_size": side}
    key = small_stem(sized) if spec.get("arch") in ("torchvision", "timm") else side
    if key not in built:
        try:
            built[key] = build_model(sized)
        except ArtifactError as exc:
            built[key] = str(exc)
    model = built[key]
    if isinstance(model, str):
        return model
    return forward_problem(model, torch.zeros(1, int(spec["in_channels"]), side, side))


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
        path = input_file(str(spec["weights"]), "model.weights")
        options.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:
        model = timm.create_model(name, **options)
    except Exception as exc:  # timm raises RuntimeError/ValueError/KeyError for bad files and names
        raise ArtifactError(f"timm {name}: {type(exc).__name__}: {str(exc)[:300]}") from None
    _adapt(model, spec, None)
    return model
