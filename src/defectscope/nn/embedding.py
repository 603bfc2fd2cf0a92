"""Patch embeddings from multi-layer backbone features (shared by the memory-bank methods)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_average(feature: torch.Tensor, size: int) -> torch.Tensor:
    """Average each position with its ``size`` x ``size`` neighbourhood (zero padding at the edges)."""
    if size <= 1:
        return feature
    return F.avg_pool2d(feature, size, stride=1, padding=size // 2)


def pool_channels(feature: torch.Tensor, dim: int) -> torch.Tensor:
    """Resample the channel axis of (B, C, h, w) to ``dim`` channels by adaptive averaging."""
    b, c, h, w = feature.shape
    if c == dim:
        return feature
    flat = feature.permute(0, 2, 3, 1).reshape(-1, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)


def patch_embedding(features: list[torch.Tensor], neighbourhood: int = 3, dim: int | None = None) -> torch.Tensor:
    """(B, D, h, w) embedding at the resolution of the first (finest) feature map.

    Each layer is averaged over its local neighbourhood, upsampled bilinearly to the finest
    resolution and, when ``dim`` is given, pooled to ``dim // n_layers`` channels so every layer
    weighs the same in distances; the layers are then concatenated.
    """
    size = features[0].shape[-2:]
    per_layer = None if dim is None else dim // len(features)
    parts = []
    for feature in features:
        feature = local_average(feature, neighbourhood)
        if feature.shape[-2:] != size:
            feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
        parts.append(feature if per_layer is None else pool_channels(feature, per_layer))
    return torch.cat(parts, dim=1)
