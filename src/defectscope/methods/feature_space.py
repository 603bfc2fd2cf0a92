"""Diffusion in the frozen backbone's feature space (``space="features"`` of DDAD and GLAD).

Instead of pixels, the UNet denoises the backbone's feature maps: every requested layer brought
to the finest layer's grid (bilinearly) and stacked, each channel standardised with its mean and
standard deviation over the good training images, so that the data has the unit scale the noise
schedule assumes. The anomaly map is ``1 - cos`` between an image's features and their
reconstruction at each grid position, upsampled to the image and blurred. The idea is that of
latent diffusion (and of feature-space diffusion for anomaly detection, e.g. LafitE, Yin et al.
2023): a pretrained encoder already separates parts from defects, so the denoiser only has to
learn the distribution of normal features, which a CPU learns in minutes where a pixel-space
DDPM needs GPU-days.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..postprocess import anomaly_maps


def grid_features(extractor: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) features of images (B, 3, H, W) in [0, 1], every layer on the first (finest) layer's grid."""
    maps = extractor(images)
    grid = maps[0].shape[-2:]
    return torch.cat(
        [
            m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in maps
        ],
        1,
    )


@torch.no_grad()
def feature_stats(extractor: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(2, C) per-channel mean and standard deviation of the grid features of the image batches."""
    total = square = None
    count = 0
    for images in batches:
        f = grid_features(extractor, images).double()
        s, q = f.sum((0, 2, 3)), f.pow(2).sum((0, 2, 3))
        total, square = (s, q) if total is None or square is None else (total + s, square + q)
        count += f.shape[0] * f.shape[2] * f.shape[3]
    if total is None or square is None or count < 2:
        raise ValueError("feature statistics need at least one batch of images")
    mean = total / count
    std = ((square / count - mean.pow(2)).clamp(min=0) * count / (count - 1)).sqrt()
    return torch.stack([mean, std.clamp(min=1e-6)]).float()


def standardise(features: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Features (B, C, h, w) with each channel's training mean removed and divided by its standard deviation."""
    return (features - stats[0].view(1, -1, 1, 1)) / stats[1].view(1, -1, 1, 1)


def feature_space_map(y: torch.Tensor, recon: torch.Tensor, size: tuple[int, ...], sigma: float) -> torch.Tensor:
    """(B, H, W) ``1 - cos`` between features and their reconstruction, upsampled to ``size`` and blurred."""
    return anomaly_maps(1 - F.cosine_similarity(y, recon, dim=1), size, sigma)
