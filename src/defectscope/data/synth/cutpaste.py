"""CutPaste (Li et al. 2021): a piece of the image itself, colour-jittered, pasted somewhere else."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .augment import changed_region, color_jitter
from .base import check_image

JITTER = 0.1  # brightness, contrast, saturation and hue jitter of the paper
_MAX_TRIES = 20  # redraws while less than half of the pasted piece differs visibly from what it covers


def _patch(image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A rectangle of area ratio [0.02, 0.15] and aspect ratio (h / w) in [0.3, 3.3], pasted unrotated."""
    _, height, width = image.shape
    area = rng.uniform(0.02, 0.15) * height * width
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    h = min(height, max(1, round(math.sqrt(area * aspect))))
    w = min(width, max(1, round(math.sqrt(area / aspect))))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    piece = color_jitter(image[:, top : top + h, left : left + w], rng, JITTER, JITTER, JITTER, JITTER)
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    candidate = image.clone()
    candidate[:, top : top + h, left : left + w] = piece
    region = torch.zeros((height, width), dtype=torch.bool)
    region[top : top + h, left : left + w] = True
    return candidate, region


def _scar(image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A thin rectangle (width 2-16 px, length 10-25 px at 256 px, scaled), rotated by [-45, 45] degrees."""
    _, height, width = image.shape
    scale = min(height, width) / 256.0
    h = min(height, max(1, round(rng.uniform(10, 25) * scale)))  # length, along the rows before rotation
    w = min(width, max(1, round(rng.uniform(2, 16) * scale)))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    piece = color_jitter(image[:, top : top + h, left : left + w], rng, JITTER, JITTER, JITTER, JITTER)

    angle = math.radians(rng.uniform(-45.0, 45.0))
    radius = math.hypot(h, w) / 2.0
    cy = rng.uniform(radius, height - radius) if height > 2 * radius else height / 2.0
    cx = rng.uniform(radius, width - radius) if width > 2 * radius else width / 2.0
    ys = torch.arange(height, dtype=torch.float64)[:, None] + 0.5 - cy  # pixel centres relative to the centre
    xs = torch.arange(width, dtype=torch.float64)[None, :] + 0.5 - cx
    u = math.cos(angle) * ys + math.sin(angle) * xs  # coordinates along the rotated rectangle
    v = -math.sin(angle) * ys + math.cos(angle) * xs
    region = (u.abs() <= h / 2.0) & (v.abs() <= w / 2.0)
    grid = torch.stack([2.0 * v / w, 2.0 * u / h], dim=-1)[None].to(image.dtype)  # (x, y) in [-1, 1] on the piece
    sampled = F.grid_sample(piece[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    return torch.where(region[None], sampled, image), region


class CutPaste:
    """CutPaste anomalies: ``variant="patch"`` (kind ``cutpaste``) or ``variant="scar"`` (kind ``scar``).

    A piece cut from the image is colour-jittered (brightness, contrast, saturation, hue by 0.1)
    and pasted at another random place. Pasting a piece onto a look-alike background (e.g. black
    onto black) changes little, so a placement is redrawn (up to 20 times, keeping the best) until
    at least half of its pixels change. The mask marks exactly the pixels that changed by at least
    one 8-bit grey level.
    """

    def __init__(self, variant: str = "patch") -> None:
        if variant not in ("patch", "scar"):
            raise ValueError(f"CutPaste variant must be 'patch' or 'scar', got {variant!r}")
        self.variant = variant
        self.kind = "cutpaste" if variant == "patch" else "scar"

    def __repr__(self) -> str:
        return f"CutPaste(variant={self.variant!r})"

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_image(image)
        paste = _patch if self.variant == "patch" else _scar
        best: tuple[float, torch.Tensor, torch.Tensor] | None = None
        for _ in range(_MAX_TRIES):
            candidate, region = paste(image, rng)
            result, mask = changed_region(image, candidate, region)
            changed = float(mask.sum()) / max(1, int(region.sum()))
            if best is None or changed > best[0]:
                best = (changed, result, mask)
            if changed >= 0.5:
                break
        assert best is not None  # _MAX_TRIES >= 1
        return best[1], best[2]
