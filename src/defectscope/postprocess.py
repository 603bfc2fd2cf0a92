"""Turning raw patch scores into anomaly maps.

Every method goes through these functions, so maps mean the same thing whatever the method; the
decision threshold is set in :mod:`defectscope.thresholds`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel with radius 4 sigma."""
    radius = max(1, math.ceil(4.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps with reflected borders."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps)
    radius = kernel.numel() // 2
    x = maps[:, None]
    pad_h = min(radius, maps.shape[-2] - 1)
    pad_w = min(radius, maps.shape[-1] - 1)
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x
    x = F.conv2d(x, kernel[radius - pad_w : radius + pad_w + 1].view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else x
    x = F.conv2d(x, kernel[radius - pad_h : radius + pad_h + 1].view(1, 1, -1, 1))
    return x[:, 0]


def anomaly_maps(patch_scores: torch.Tensor, size: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Upsample (B, h, w) patch scores bilinearly to ``size`` and smooth them: (B, H, W)."""
    maps = F.interpolate(patch_scores[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma)
