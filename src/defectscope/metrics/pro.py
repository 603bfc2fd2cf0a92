"""Per-region overlap (PRO) curve and AUPRO, as in the MVTec AD evaluation protocol.

Regions are the 8-connected components of each image's ground-truth mask; images may differ in
size when masks and maps come as sequences of 2-D arrays (:mod:`.pixels`). At a threshold ``t``
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

from .pixels import Pixels, check_masks_maps, count_pixels
from .ranking import Ranking, rank_split, require_both_classes

# 8-connectivity within an image, never across images of the stack.
_IN_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8[1] = True
_PLANE_8 = np.ones((3, 3), dtype=bool)


def _region_sizes(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Size of the region of each anomalous pixel (``masks[masks]`` order) and the number of regions."""
    regions, n_regions = ndimage.label(masks, structure=_IN_PLANE_8 if masks.ndim == 3 else _PLANE_8)
    region_of_pixel = regions[masks]
    sizes = np.bincount(region_of_pixel, minlength=n_regions + 1)
    return sizes[region_of_pixel].astype(np.float64), n_regions


def region_weights(masks: Pixels) -> np.ndarray:
    """Weight ``1 / (n_regions * region_size)`` of each anomalous pixel, image after image in
    ``mask[mask]`` order (that is ``masks[masks]`` for a stack).

    The weights of a region sum to ``1 / n_regions``: the region's share of the mean over regions.
    """
    if isinstance(masks, np.ndarray):
        sizes, n_regions = _region_sizes(masks)
    else:
        parts = [_region_sizes(m) for m in masks]
        sizes, n_regions = np.concatenate([p[0] for p in parts]), sum(p[1] for p in parts)
    return 1.0 / (n_regions * sizes)


def _gather(masks: Pixels, maps: Pixels) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the anomalous and of the normal pixels of all images, in the order of a stack."""
    counts = [int(np.count_nonzero(m)) for m in masks]
    dtype = np.result_type(*{a.dtype for a in maps})
    pos = np.empty(sum(counts), dtype)
    neg = np.empty(sum(a.size for a in maps) - pos.size, dtype)
    i = j = 0
    for m, a, k in zip(masks, maps, counts):  # one image at a time: no temporary of all pixels
        pos[i : i + k] = a[m]
        neg[j : j + a.size - k] = a[~m]
        i, j = i + k, j + a.size - k
    return pos, neg


def rank_pixels(masks: Pixels, maps: Pixels, compact: bool = True) -> Ranking:
    """Rank all pixels once, carrying region weights so the same ranking also yields PRO.

    ``masks`` and ``maps`` are validated (:func:`check_masks_maps`): both stacked or both lists.
    ``compact`` keeps only the thresholds that can change a metric value (exact and several
    times faster); the full curve for plots needs ``compact=False``.
    """
    weights = region_weights(masks)  # first: the labels of a stack are freed before its pixels are copied
    if isinstance(masks, np.ndarray) and isinstance(maps, np.ndarray):
        pos, neg = maps[masks], maps[~masks]
    else:
        pos, neg = _gather(masks, maps)
    return rank_split(pos, neg, weights, compact=compact, overwrite=True, name="maps")


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
    require_both_classes(*count_pixels(m), "masks", "pixel")
    return rank_pixels(m, a, compact)


def pro_curve(masks: object, maps: object) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve ``(fpr, pro)``, FPR increasing from 0 to 1, one point per distinct score.

    Raises ValueError when the masks have no anomalous or no normal pixel.
    """
    return pro_points(_ranked(masks, maps, compact=False))


def aupro(masks: object, maps: object, fpr_limit: float = 0.3) -> float:
    """AUPRO of anomaly ``maps`` against boolean ground-truth ``masks``: both (N, H, W), or
    sequences of N 2-D arrays (one per image, each mask shaped like its map).

    Raises ValueError when the masks have no anomalous or no normal pixel.
    """
    limit = _check_fpr_limit(fpr_limit)
    return aupro_from(_ranked(masks, maps, compact=True), limit)
