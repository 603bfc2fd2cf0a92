"""Turning raw patch scores into anomaly maps.

Every method goes through these functions, so maps mean the same thing whatever the method; the
decision threshold is set in :mod:`defectscope.thresholds`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
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


@lru_cache(maxsize=64)
def map_operator(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """(n_out, n_in) matrix of one axis of :func:`anomaly_maps`: linear upsampling (pixel centres
    aligned, as ``F.interpolate(..., align_corners=False)``), then the Gaussian smoothing of
    :func:`gaussian_blur` with its reflected border. Both steps are linear and separable, so a map
    is ``A_h @ scores @ A_w.T``: a few small matrix products instead of a convolution at full size.
    Built in numpy (float64), so tracing a caller for export records the matrix as a constant."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    up = np.zeros((n_out, n_in))
    np.add.at(up, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(up, (np.arange(n_out), high), frac)
    if sigma > 0:
        kernel = gaussian_kernel(sigma).double().numpy()
        radius = kernel.size // 2
        pad = min(radius, n_out - 1)
        blur = np.zeros((n_out, n_out))
        for offset in range(-pad, pad + 1):
            j = np.arange(n_out) + offset
            j = np.where(j < 0, -j, np.where(j > n_out - 1, 2 * (n_out - 1) - j, j))  # reflect, edge not repeated
            np.add.at(blur, (np.arange(n_out), j), kernel[radius + offset])
        up = blur @ up
    return torch.from_numpy(up.astype(np.float32))


def anomaly_maps(patch_scores: torch.Tensor, size: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Upsample (B, h, w) patch scores bilinearly to ``size`` and smooth them: (B, H, W).

    Equal (to float rounding) to ``gaussian_blur(F.interpolate(..., mode="bilinear"), sigma)``,
    computed as two matrix products (:func:`map_operator`); the matrices depend only on the sizes,
    so the same function traces into an ONNX graph with them as constants.
    """
    h, w = patch_scores.shape[-2:]
    rows = map_operator(int(h), int(size[0]), float(sigma)).to(patch_scores.device)
    cols = map_operator(int(w), int(size[1]), float(sigma)).to(patch_scores.device)
    return torch.matmul(torch.matmul(rows, patch_scores.float()), cols.T)
