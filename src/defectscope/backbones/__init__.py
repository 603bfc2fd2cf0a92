"""Pretrained CNN feature extractors, written natively in torch, and their weight files.

>>> ext = create_backbone("efficientnet_lite0", layers=("s8", "s16"))
>>> feats = ext(images)          # images: (B, 3, H, W) RGB in [0, 1]; normalised inside
>>> ext.channels, ext.strides    # [40, 112], [8, 16]

Layer "sN" is the output of the last block at stride N; see each network's module for the exact
blocks. Weights are found by :func:`resolve_weights` (explicit file, ``$DEFECTSCOPE_WEIGHTS_DIR``,
installed package, torch hub cache, download).
"""

from .extractor import (
    BACKBONES,
    DEFAULT_LAYERS,
    LAYERS,
    FeatureExtractor,
    create_backbone,
    create_classifier,
)
from .weights import WEIGHT_FILES, WEIGHTS_DIR_ENV, resolve_weights

__all__ = [
    "BACKBONES",
    "DEFAULT_LAYERS",
    "LAYERS",
    "WEIGHTS_DIR_ENV",
    "WEIGHT_FILES",
    "FeatureExtractor",
    "create_backbone",
    "create_classifier",
    "resolve_weights",
]
