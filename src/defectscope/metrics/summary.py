"""The metric sets reported for an evaluation run: image-level, pixel-level, or both.

Image metrics need both good and defective test images and raise ValueError otherwise. Pixel
metrics return NaN (with a RuntimeWarning) when the masks hold no anomalous pixel (or no normal
pixel): a test split without pixel annotations still gets its image metrics instead of failing.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from defectscope.metrics.curves import (
    auroc_from,
    average_precision_from,
    f1_max_from,
    precision_recall_from,
    thin_curve,
)
from defectscope.metrics.pro import aupro_from, check_masks_maps, pro_points, rank_pixels
from defectscope.metrics.ranking import Ranking, rank

PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
PRO_FPR_LIMIT = 0.3

Curve = tuple[np.ndarray, np.ndarray]


def _image_metrics_from(r: Ranking) -> dict[str, float]:
    return {
        "image_auroc": auroc_from(r),
        "image_ap": average_precision_from(r),
        "image_f1_max": f1_max_from(r)[0],
    }


def image_metrics(labels: object, scores: object) -> dict[str, float]:
    """AUROC, AP and F1-max of per-image ``scores`` for ``labels`` (1 = defective)."""
    return _image_metrics_from(rank(labels, scores))


def pixel_metrics(masks: object, maps: object, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO of ``maps`` (N, H, W) against ``masks`` (N, H, W).

    All four come from one ranking of all pixels. NaN for every value (and a RuntimeWarning)
    when the masks contain only one class.
    """
    m, a = check_masks_maps(masks, maps)
    return _pixel_metrics(m, a, fpr_limit, stacklevel=3)[0]


def _pixel_metrics(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float, stacklevel: int
) -> tuple[dict[str, float], Ranking | None]:
    """Pixel metrics and the ranking they came from (None when the masks hold one class)."""
    n_pos = int(np.count_nonzero(masks))
    if n_pos == 0 or n_pos == masks.size:
        missing = "anomalous" if n_pos == 0 else "normal"
        warnings.warn(
            f"masks contain no {missing} pixel; pixel metrics are NaN",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        return dict.fromkeys(PIXEL_KEYS, math.nan), None
    r = rank_pixels(masks, maps)
    metrics = {
        "pixel_auroc": auroc_from(r),
        "pixel_ap": average_precision_from(r),
        "pixel_f1_max": f1_max_from(r)[0],
        "aupro": aupro_from(r, fpr_limit),
    }
    return metrics, r


def compute_metrics(
    labels: object, scores: object, masks: object = None, maps: object = None
) -> dict[str, float]:
    """Image metrics, plus pixel metrics when both ``masks`` and ``maps`` are given."""
    return _compute(labels, scores, masks, maps, n_points=None)[0]


def compute_metrics_and_curves(
    labels: object, scores: object, masks: object = None, maps: object = None, n_points: int = 300
) -> tuple[dict[str, float], dict[str, Curve]]:
    """:func:`compute_metrics` plus curves for plots, each thinned to at most ``n_points`` points.

    Curves are (x, y) pairs: ``roc`` (FPR, TPR) and ``pr`` (recall, precision) of the images
    and, with pixel data, ``pro`` (FPR, PRO) up to FPR 0.3, read from the same rankings as the
    metrics (no second pass over the pixels).
    """
    return _compute(labels, scores, masks, maps, n_points)


def _compute(
    labels: object, scores: object, masks: object, maps: object, n_points: int | None
) -> tuple[dict[str, float], dict[str, Curve]]:
    r = rank(labels, scores)
    result = _image_metrics_from(r)
    curves: dict[str, Curve] = {}
    if n_points is not None:
        precision, recall = precision_recall_from(r)
        curves["roc"] = thin_curve(np.append(0.0, r.fp / r.n_neg), np.append(0.0, r.tp / r.n_pos), n_points)
        curves["pr"] = thin_curve(np.append(0.0, recall), np.append(1.0, precision), n_points)
    if masks is None and maps is None:
        return result, curves
    if masks is None or maps is None:
        raise ValueError("pixel metrics need both masks and maps; got only one of them")
    m, a = check_masks_maps(masks, maps)
    n_images = np.shape(labels)[0]
    if m.shape[0] != n_images:
        raise ValueError(f"{n_images} image labels but {m.shape[0]} masks/maps")
    pixel, ranking = _pixel_metrics(m, a, PRO_FPR_LIMIT, stacklevel=4)
    result.update(pixel)
    if n_points is not None and ranking is not None:
        curves["pro"] = thin_curve(*_clip_curve(*pro_points(ranking), PRO_FPR_LIMIT), n_points)
    return result, curves


def _clip_curve(x: np.ndarray, y: np.ndarray, x_max: float) -> Curve:
    """The part of a curve with ``x <= x_max`` (x non-decreasing), ending exactly at ``x_max``."""
    k = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < x_max:
        y_end = ys[-1] + (y[k] - ys[-1]) * (x_max - xs[-1]) / (x[k] - xs[-1])
        xs, ys = np.append(xs, x_max), np.append(ys, y_end)
    return xs, ys
