"""Detectors built on a frozen pretrained backbone: one place for building it and checking its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ..backbones import BACKBONES, LAYERS, FeatureExtractor, create_backbone, resolve_weights
from ..checkpoint import sha256_file
from ..errors import DefectscopeError, ModelFileError
from .base import Detector
from .params import check_choice


class BackboneDetector(Detector):
    """A detector whose features come from ``create_backbone(backbone, layers, weights)``.

    The weights are not copied into the run folder (they are large and public); their sha256 is
    recorded instead, and loading refuses a model whose backbone weights have changed.
    """

    extra_config_keys: ClassVar[dict[str, type]] = {"backbone_weights_sha256": str}

    def __init__(
        self, *, backbone: str, layers: tuple[str, ...] | list[str], weights: str | None, **common: Any
    ) -> None:
        super().__init__(**common)
        check_choice("backbone", backbone, BACKBONES)
        unknown = [layer for layer in layers if layer not in LAYERS]
        if not layers or unknown:
            raise DefectscopeError(f"layers must be one or more of {', '.join(LAYERS)}, got {list(layers)}")
        self.backbone = backbone
        self.layers = tuple(layers)
        self.weights = weights
        self._extractor: FeatureExtractor | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        """The frozen backbone, built on first use."""
        if self._extractor is None:
            self._extractor = create_backbone(self.backbone, layers=self.extracted_layers, weights=self.weights).to(
                self.device
            )
        return self._extractor

    @property
    def extracted_layers(self) -> tuple[str, ...]:
        """Layers :meth:`features` returns: ``layers`` unless a method needs more."""
        return self.layers

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone feature maps (on the CPU) of the requested layers for images (B, 3, H, W) in [0, 1]."""
        return [f.float().cpu() for f in self.extractor(images.to(self.device))]

    def _modules(self) -> dict[str, torch.nn.Module | None]:
        return super()._modules() | {"extractor": self._extractor}

    def preflight(self) -> None:
        resolve_weights(self.backbone, self.weights)

    def _extra_config(self) -> dict[str, Any]:
        return {"backbone_weights_sha256": sha256_file(resolve_weights(self.backbone, self.weights))}

    def _check_config(self, config: dict[str, Any], folder: Path) -> None:
        expected = config.get("backbone_weights_sha256")
        path = resolve_weights(self.backbone, self.weights)
        if expected and sha256_file(path) != expected:
            raise ModelFileError(
                f"{folder}: fitted with other {self.backbone} weights than {path} (sha256 differs); "
                "use the weights file the model was fitted with"
            )
