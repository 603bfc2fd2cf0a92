"""Colour and geometry augmentations on (3, H, W) tensors in [0, 1], driven by a numpy Generator.

Every random choice comes from the ``rng`` passed in (never torch's global generator), so a
synthesiser called with the same generator state gives the same result in any thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


def grey(image: torch.Tensor) -> torch.Tensor:
    """Luma (1, H, W) of an RGB image."""
    r, g, b = image
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)[None]


def rotate_hue(image: torch.Tensor, turns: float) -> torch.Tensor:
    """Rotate the hue by ``turns`` of a full circle (a rotation of the chroma plane in YIQ space)."""
    angle = 2.0 * math.pi * turns
    cos, sin = math.cos(angle), math.sin(angle)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rotation = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq
    return torch.einsum("ij,jhw->ihw", matrix.to(image.dtype), image)


def color_jitter(
    image: torch.Tensor, rng: np.random.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in [1 - x, 1 + x] and a hue turn in [-hue, hue]."""
    b, c, s = (rng.uniform(1 - x, 1 + x) for x in (brightness, contrast, saturation))
    h = rng.uniform(-hue, hue)
    out = (image * b).clamp(0, 1)
    out = ((out - grey(out).mean()) * c + grey(out).mean()).clamp(0, 1)
    luma = grey(out)
    out = ((out - luma) * s + luma).clamp(0, 1)
    return rotate_hue(out, h).clamp(0, 1)


def _gamma(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return image.clamp(0, 1) ** rng.uniform(0.5, 2.0)


def _brightness(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return image * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30) / 255.0


def _channel_shuffle(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    order = rng.permutation(3)
    while (order == np.arange(3)).all():
        order = rng.permutation(3)
    return rotate_hue(image[torch.from_numpy(order)], rng.uniform(-0.15, 0.15))


def _posterise(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    levels = 2 ** int(rng.integers(1, 5))
    return torch.floor(image.clamp(0, 1) * (levels - 1e-6)) / (levels - 1)


def _invert(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return 1.0 - image


def _solarise(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    threshold = rng.uniform(32, 128) / 255.0
    return torch.where(image >= threshold, 1.0 - image, image)


def _sharpen(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    blurred = F.avg_pool2d(F.pad(image[None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]
    return image + rng.uniform(1.0, 3.0) * (image - blurred)


def _autocontrast(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    low = image.amin(dim=(1, 2), keepdim=True)
    high = image.amax(dim=(1, 2), keepdim=True)
    return (image - low) / (high - low).clamp_min(1e-3)


COLOUR_OPS: tuple[Callable[[torch.Tensor, np.random.Generator], torch.Tensor], ...] = (
    _gamma,
    _brightness,
    _channel_shuffle,
    _posterise,
    _invert,
    _solarise,
    _sharpen,
    _autocontrast,
)


def random_colour(image: torch.Tensor, rng: np.random.Generator, n_ops: int = 3) -> torch.Tensor:
    """Apply ``n_ops`` distinct colour operations drawn from :data:`COLOUR_OPS`, in random order (as DRAEM does)."""
    for index in rng.choice(len(COLOUR_OPS), size=n_ops, replace=False):
        image = COLOUR_OPS[index](image, rng).clamp(0, 1)
    return image


def random_geometry(image: torch.Tensor, rng: np.random.Generator, min_crop: float = 0.5) -> torch.Tensor:
    """Random crop (each side a fraction in [min_crop, 1]) rescaled to full size, flips, and a rotation.

    The rotation angle is drawn from [-180, 180) degrees; corners are filled by reflection.
    """
    _, height, width = image.shape
    crop_h = max(1, round(height * rng.uniform(min_crop, 1.0)))
    crop_w = max(1, round(width * rng.uniform(min_crop, 1.0)))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    out = image[:, top : top + crop_h, left : left + crop_w]
    flips = [d for d, flip in ((1, rng.random() < 0.5), (2, rng.random() < 0.5)) if flip]
    if flips:
        out = out.flip(flips)
    out = F.interpolate(out[None], size=(height, width), mode="bilinear", align_corners=False)
    angle = math.radians(rng.uniform(-180.0, 180.0))
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]]], dtype=out.dtype)
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    return F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of a (C, H, W) tensor; returned as is when already ``size``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def changed_region(
    image: torch.Tensor, candidate: torch.Tensor, region: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``candidate`` only where ``region`` is set and it differs visibly from ``image``.

    "Visibly" means by at least one 8-bit grey level (1/255) in some channel, so the change
    survives saving as 8-bit PNG. Returns (result, mask): the result equals ``image`` bit for bit
    outside the mask, and the mask (float32 in {0, 1}) marks exactly the changed pixels.
    """
    candidate = candidate.clamp(0, 1).to(image.dtype)
    mask = region & ((candidate - image).abs().amax(dim=0) >= 1.0 / 255.0)
    return torch.where(mask[None], candidate, image), mask.to(torch.float32)
