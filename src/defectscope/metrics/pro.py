"""Per-region overlap (PRO) curve and AUPRO, as in the MVTec AD evaluation protocol.

Regions are the 8-connected components of each image's ground-truth mask. At a threshold ``t``
PRO is the mean, over all regions of all images, of the fraction of the region's pixels scoring
``>= t``; FPR is the fraction of all normal pixels (good images included) scoring ``>= t``.
AUPRO integrates PRO over FPR from 0 to ``fpr_limit`` (trapezoids, the end point interpolated)
and divides by ``fpr_limit`` so a perfect map scores 1.

Exact and fast: giving every anomalous pixel the weight ``1 / (n_regions * region_size)`` makes
PRO(t) the summed weight of anomalous pixels scoring ``>= t``, i.e. a cumulative sum over the
same ranking the pixel ROC uses; no per-threshold or per-region pass over the images.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .ranking import (
    Ranking,
    as_binary,
    as_scores,
    rank_split,
    require_both_classes,
)

# 8-connectivity within an image, never across images of the stack.
_IN_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8[1] = True


def check_masks_maps(masks: object, maps: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate pixel-level inputs: ``(N, H, W)`` binary masks and real maps of the same shape."""
    m = as_binary(masks, "masks")
    a = as_scores(maps, "maps")
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(f"masks and maps must be (N, H, W) arrays, got shapes {m.shape} and {a.shape}")
    if m.shape != a.shape:
        raise ValueError(f"masks and maps differ in shape: {m.shape} vs {a.shape}")
    if m.size == 0:
        raise ValueError(f"masks and maps are empty (shape {m.shape})")
    return m, a


def region_weights(masks: np.ndarray) -> np.ndarray:
    """Weight ``1 / (n_regions * region_size)`` of each anomalous pixel, in ``masks[masks]`` order.

    The weights of a region sum to ``1 / n_regions``: the region's share of the mean over regions.
    """
    regions, n_regions = ndimage.label(masks, structure=_IN_PLANE_8)
    region_of_pixel = regions[masks]
    sizes = np.bincount(region_of_pixel, minlength=n_regions + 1)
    return 1.0 / (n_regions * sizes[region_of_pixel].astype(np.float64))


def rank_pixels(masks: np.ndarray, maps: np.ndarray, compact: bool = True) -> Ranking:
    """Rank all pixels once, carrying region weights so the same ranking also yields PRO.

    ``compact`` keeps only the thresholds that can change a metric value (exact and several
    times faster); the full curve for plots needs ``compact=False``.
    """
    return rank_split(maps[masks], maps[~masks], region_weights(masks), compact=compact, name="maps")


def pro_points(r: Ranking) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) from (0, 0) through one point per distinct score to (1, 1)."""
    if r.gain is None:
        raise ValueError("PRO needs a ranking with region weights (from rank_pixels)")
    fpr = np.concatenate(([0.0], r.fp / r.n_neg))
    pro = np.concatenate(([0.0], r.gain))
    return fpr, pro


def area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` for ``x`` in ``[0, x_max]``; ``x`` non-decreasing from 0.

    When ``x_max`` falls between two points, ``y`` is linearly interpolated there.
    """
    k = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:k], y[:k]
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)
    if k < x.size and xs[-1] < x_max:
        y_end = ys[-1] + (y[k] - ys[-1]) * (x_max - xs[-1]) / (x[k] - xs[-1])
        area += float((ys[-1] + y_end) * (x_max - xs[-1]) / 2.0)
    return area


def _check_fpr_limit(fpr_limit: float) -> float:
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return limit


def aupro_from(r: Ranking, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``."""
    limit = _check_fpr_limit(fpr_limit)
    fpr, pro = pro_points(r)
    return area_to(fpr, pro, limit) / limit


def _ranked(masks: object, maps: object, compact: bool) -> Ranking:
    m, a = check_masks_maps(masks, maps)
    n_pos = int(np.count_nonzero(m))
    require_both_classes(n_pos, m.size - n_pos, "masks", "pixel")
    return rank_pixels(m, a, compact)


def pro_curve(masks: object, maps: object) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve ``(fpr, pro)``, FPR increasing from 0 to 1, one point per distinct score.

    Raises ValueError when the masks have no anomalous or no normal pixel.
    """
    return pro_points(_ranked(masks, maps, compact=False))


def aupro(masks: object, maps: object, fpr_limit: float = 0.3) -> float:
    """AUPRO of anomaly ``maps`` (N, H, W) against boolean ground-truth ``masks`` (N, H, W).

    Raises ValueError when the masks have no anomalous or no normal pixel.
    """
    limit = _check_fpr_limit(fpr_limit)
    return aupro_from(_ranked(masks, maps, compact=True), limit)
