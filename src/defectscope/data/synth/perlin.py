"""Perlin gradient noise and the thresholded, rotated noise masks DRAEM uses for anomaly shapes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_MASK_FRACTION = 0.005  # a mask covers at least 0.5 % of the image
_MAX_TRIES = 100


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolation curve 6t^5 - 15t^4 + 10t^3 (zero first and second derivative at 0 and 1)."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise of ``shape`` (H, W) with ``res`` (rows, columns) noise periods.

    A random unit gradient sits on each of the (res_y + 1) x (res_x + 1) lattice points; every
    pixel blends the dot products with its four surrounding gradients. Any shape works (it need
    not be a multiple of ``res``). Scaled by sqrt(2) as in DRAEM, so values lie within [-1, 1]
    (float32), mostly within [-0.7, 0.7].
    """
    height, width = shape
    res_y, res_x = res
    if height <= 0 or width <= 0 or res_y <= 0 or res_x <= 0:
        raise ValueError(f"shape and res must be positive, got shape={shape!r} res={res!r}")
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(res_y + 1, res_x + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (res_y + 1, res_x + 1, 2) as (dy, dx)

    y = np.arange(height) * (res_y / height)
    x = np.arange(width) * (res_x / width)
    cy, cx = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - cy)[:, None], (x - cx)[None, :]  # position inside the cell, (H, 1) and (1, W)

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[(cy + dy)[:, None], (cx + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    wy, wx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
    return (np.sqrt(2.0) * (top * (1 - wy) + bottom * wy)).astype(np.float32)


def perlin_mask(
    shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5, min_scale: int = 0, max_scale: int = 6
) -> np.ndarray:
    """Boolean (H, W) anomaly shape: Perlin noise above ``threshold``, rotated by a random angle.

    As in DRAEM, the noise has 2^k periods per axis, k drawn independently per axis from
    [min_scale, max_scale), and is rotated by an angle in [-90, 90) degrees. Draws are repeated
    until at least 0.5 % of the pixels are set, so the mask is never empty.
    """
    if not 0 <= min_scale < max_scale:
        raise ValueError(f"need 0 <= min_scale < max_scale, got {min_scale}, {max_scale}")
    need = max(1, int(np.ceil(MIN_MASK_FRACTION * shape[0] * shape[1])))
    for _ in range(_MAX_TRIES):
        res = (2 ** int(rng.integers(min_scale, max_scale)), 2 ** int(rng.integers(min_scale, max_scale)))
        noise = perlin_noise(shape, res, rng)
        noise = ndimage.rotate(noise, rng.uniform(-90.0, 90.0), reshape=False, order=1, mode="reflect")
        mask = noise > threshold
        if mask.sum() >= need:
            return mask
    raise ValueError(
        f"perlin_mask: no mask covering 0.5 % of {shape} in {_MAX_TRIES} draws; threshold {threshold} is too high"
    )
