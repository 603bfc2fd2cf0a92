"""Crop&Paste: real defect regions, cut with their masks from labelled images, pasted onto good images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DefectscopeError
from .augment import changed_region, color_jitter
from .base import check_image

JITTER = 0.05  # small brightness, contrast, saturation and hue jitter
SCALE = (0.75, 1.25)


class CropPaste:
    """Paste defect regions from a few labelled defect images at random places on the good image.

    ``defects`` holds (image (3, H, W), mask (H, W)) pairs at the working image size; the masked
    region (its bounding box, keeping the mask's shape) is flipped at random, rotated by a
    multiple of 90 degrees, scaled by [0.75, 1.25] (shrunk further if it would not fit), lightly
    colour-jittered and pasted so that it lies inside the image. The returned mask marks exactly
    the pixels that changed by at least one 8-bit grey level.
    """

    kind = "croppaste"

    def __init__(self, defects: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._regions: list[tuple[torch.Tensor, torch.Tensor]] = []
        for index, (image, mask) in enumerate(defects):
            check_image(image, f"defect image {index}")
            mask = torch.as_tensor(mask).bool()
            if tuple(mask.shape) != tuple(image.shape[1:]):
                raise DefectscopeError(
                    f"defect {index}: mask is {tuple(mask.shape)} but its image is {tuple(image.shape[1:])}"
                )
            if not mask.any():
                raise DefectscopeError(f"defect {index}: mask is empty, so there is no defect region to paste")
            rows, cols = torch.nonzero(mask.any(dim=1))[:, 0], torch.nonzero(mask.any(dim=0))[:, 0]
            box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            self._regions.append((image[:, box[0], box[1]].clone(), mask[box].clone()))
        if not self._regions:
            raise DefectscopeError("CropPaste needs at least one labelled defect (image, mask) pair")

    def __repr__(self) -> str:
        return f"CropPaste({len(self._regions)} defect regions)"

    def __len__(self) -> int:
        return len(self._regions)

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_image(image)
        _, height, width = image.shape
        piece, shape = self._regions[int(rng.integers(len(self._regions)))]
        piece = piece.to(image.dtype)
        flips = [d for d, flip in ((-2, rng.random() < 0.5), (-1, rng.random() < 0.5)) if flip]
        quarter_turns = int(rng.integers(4))
        piece, shape = (
            piece.flip(flips).rot90(quarter_turns, (-2, -1)),
            shape.flip(flips).rot90(quarter_turns, (-2, -1)),
        )
        h, w = shape.shape
        scale = min(rng.uniform(*SCALE), height / h, width / w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        piece = F.interpolate(piece[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        shape = F.interpolate(shape[None, None].float(), size=size, mode="nearest-exact")[0, 0].bool()
        piece = color_jitter(piece, rng, JITTER, JITTER, JITTER, JITTER)
        top, left = int(rng.integers(0, height - size[0] + 1)), int(rng.integers(0, width - size[1] + 1))
        region = torch.zeros((height, width), dtype=torch.bool)
        region[top : top + size[0], left : left + size[1]] = shape
        candidate = image.clone()
        candidate[:, top : top + size[0], left : left + size[1]] = piece
        return changed_region(image, candidate, region)
