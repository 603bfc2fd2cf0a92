"""The backbone registry and the multi-layer feature extractor built from it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from .common import Backbone, Stage, init_weights
from .efficientnet_lite import EfficientNetLite0
from .fold import fold_batch_norms
from .mobilenet_v2 import MobileNetV2
from .resnet import resnet18, wide_resnet50_2
from .weights import load_weights, resolve_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a network and which input normalisation its weights were trained with."""

    build: Callable[[], Backbone]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_REGISTRY: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(MobileNetV2, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": BackboneSpec(EfficientNetLite0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "resnet18": BackboneSpec(resnet18, IMAGENET_MEAN, IMAGENET_STD),
    "wide_resnet50_2": BackboneSpec(wide_resnet50_2, IMAGENET_MEAN, IMAGENET_STD),
}

BACKBONES: tuple[str, ...] = tuple(_REGISTRY)
LAYERS: tuple[str, ...] = ("s2", "s4", "s8", "s16", "s32")
DEFAULT_LAYERS: tuple[str, ...] = ("s8", "s16")

_M = TypeVar("_M", bound=nn.Module)


class Normalize(nn.Module):
    """Map RGB in [0, 1] to the statistics the network was trained on."""

    mean: torch.Tensor  # buffers, (1, 3, 1, 1)
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class FeatureExtractor(nn.Module):
    """Frozen backbone returning the feature maps of the requested layers.

    Only the stages up to the deepest requested layer are kept (and run), so asking for
    ("s8", "s16") never computes or stores the stride-32 part of the network.
    """

    def __init__(self, name: str, stages: Sequence[Stage], layers: Sequence[str], normalize: Normalize) -> None:
        super().__init__()
        by_name = {stage.name: stage for stage in stages}
        depth = max(LAYERS.index(layer) for layer in layers) + 1
        kept = [by_name[layer] for layer in LAYERS[:depth]]
        self.name = name
        self.layers = list(layers)
        self.channels = [by_name[layer].channels for layer in layers]
        self.strides = [by_name[layer].stride for layer in layers]
        self.normalize = normalize
        self.stages = nn.ModuleList(stage.module for stage in kept)
        self._stage_names = [stage.name for stage in kept]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: (B, 3, H, W) RGB in [0, 1]; returns one map per requested layer, in order."""
        x = self.normalize(x).contiguous(memory_format=torch.channels_last)
        found: dict[str, torch.Tensor] = {}
        for stage_name, stage in zip(self._stage_names, self.stages):
            x = stage(x)
            found[stage_name] = x
        return [found[layer] for layer in self.layers]


def _check_name(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def _build(name: str, weights: str | os.PathLike[str] | None, pretrained: bool) -> Backbone:
    """The full classifier: He-initialised, or with the resolved weights when ``pretrained``.

    A pretrained network is built on the meta device and takes the loaded tensors as they are,
    which skips initialising weights that are about to be replaced.
    """
    spec = _check_name(name)
    if not pretrained and weights is None:
        model = spec.build()
        init_weights(model)
        return model
    path = resolve_weights(name, weights)
    with torch.device("meta"):
        model = spec.build()
    load_weights(model, path, name)
    return model


def _freeze(model: _M) -> _M:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def create_backbone(
    name: str,
    layers: Sequence[str] = DEFAULT_LAYERS,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    fold_bn: bool = True,
) -> FeatureExtractor:
    """Build a frozen feature extractor (eval mode, no gradients for its parameters).

    ``layers`` are stride names from :data:`LAYERS`; ``weights`` is an explicit state-dict file
    (it implies pretrained), otherwise :func:`resolve_weights` finds the official one;
    ``pretrained=False`` keeps the random initialisation. ``fold_bn`` folds batch norms into
    convolutions and uses the channels-last layout (same outputs, faster on CPU); turn it off to
    fine-tune the extractor or to load its state dict elsewhere.
    """
    spec = _check_name(name)
    layers = tuple(layers)
    unknown = [layer for layer in layers if layer not in LAYERS]
    if not layers or unknown:
        raise ValueError(f"layers must be a non-empty selection of {', '.join(LAYERS)}; got {list(layers)}")
    model = _build(name, weights, pretrained)
    extractor = _freeze(FeatureExtractor(name, model.stages(), layers, Normalize(spec.mean, spec.std)))
    if fold_bn:
        fold_batch_norms(extractor, torch.rand(1, 3, 64, 64))
        # Module.to takes memory_format, which torch's overloads of it do not declare.
        extractor.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return extractor


def create_classifier(name: str, weights: str | os.PathLike[str] | None = None, pretrained: bool = True) -> nn.Module:
    """The whole frozen ImageNet classifier: (B, 3, H, W) RGB in [0, 1] -> (B, 1000) logits."""
    spec = _check_name(name)
    model = _build(name, weights, pretrained)
    return _freeze(nn.Sequential(Normalize(spec.mean, spec.std), model))
