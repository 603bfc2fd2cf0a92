"""Accepting or rejecting a generated defect mask before an image is generated for it.

The mask model samples a probability map per defect; some samples are empty, cover most of the
image or run along its edge (a failed sample, not a defect). AnomalyDiffusion's own sampler
thresholds the map and rejects a mask when more than a third of any border row or column is
marked; the area rules add the empty and the oversized cases. The defaults keep every real
defect of MVTec AD bottle and of MTD at 256 px (the smallest has 17 pixels, the largest covers 49 %
of its image) except MTD's break, fray and uneven defects that run across the image edge: for
such a category pass ``max_border_share=None``.
"""

from __future__ import annotations

import numpy as np

#: The reasons a mask is refused (counted per reason by the sampler), and the one for a kept mask.
ACCEPTED = "accepted"
NON_FINITE = "non-finite probabilities"
EMPTY = "empty"
TOO_LARGE = "too large"
ON_BORDER = "along the border"


def accept_mask(
    prob: np.ndarray,
    *,
    threshold: float = 0.5,
    min_area: int = 16,
    max_area_share: float | None = 0.5,
    max_border_share: float | None = 1 / 3,
) -> tuple[np.ndarray | None, str]:
    """Threshold a (S, S) probability map and return (bool mask, :data:`ACCEPTED`) or (None, reason).

    Pixels with probability above ``threshold`` are defect. Refused: a map holding NaN or infinite
    values (:data:`NON_FINITE`), fewer than ``min_area`` defect pixels (:data:`EMPTY`), more than
    ``max_area_share`` of the image (:data:`TOO_LARGE`), or more than ``max_border_share`` of any one
    side's pixels marked (:data:`ON_BORDER`). None disables a share rule.
    """
    prob = np.asarray(prob)
    if prob.ndim != 2 or min(prob.shape) < 1:
        raise ValueError(f"expected a 2-D probability map, got shape {prob.shape}")
    if not np.isfinite(prob).all():
        return None, NON_FINITE
    mask = prob > threshold
    area = int(mask.sum())
    if area < max(min_area, 1):
        return None, EMPTY
    if max_area_share is not None and area > max_area_share * mask.size:
        return None, TOO_LARGE
    if max_border_share is not None:
        sides = (mask[0], mask[-1], mask[:, 0], mask[:, -1])
        if max(float(side.mean()) for side in sides) > max_border_share:
            return None, ON_BORDER
    return mask, ACCEPTED
