"""The metric sets reported for an evaluation run: image-level, pixel-level, or both.

Image metrics need both good and defective test images and raise ValueError otherwise. Pixel
metrics return NaN (with a RuntimeWarning) when the masks hold no anomalous pixel (or no normal
pixel): a test split without pixel annotations still gets its image metrics instead of failing.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from defectscope.metrics.curves import auroc_from, average_precision_from, f1_max_from
from defectscope.metrics.pro import aupro_from, check_masks_maps, rank_pixels
from defectscope.metrics.ranking import rank

PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")


def image_metrics(labels: object, scores: object) -> dict[str, float]:
    """AUROC, AP and F1-max of per-image ``scores`` for ``labels`` (1 = defective)."""
    r = rank(labels, scores)
    return {
        "image_auroc": auroc_from(r),
        "image_ap": average_precision_from(r),
        "image_f1_max": f1_max_from(r)[0],
    }


def pixel_metrics(masks: object, maps: object, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO of ``maps`` (N, H, W) against ``masks`` (N, H, W).

    All four come from one ranking of all pixels. NaN for every value (and a RuntimeWarning)
    when the masks contain only one class.
    """
    m, a = check_masks_maps(masks, maps)
    return _pixel_metrics(m, a, fpr_limit, stacklevel=3)


def _pixel_metrics(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float, stacklevel: int
) -> dict[str, float]:
    n_pos = int(np.count_nonzero(masks))
    if n_pos == 0 or n_pos == masks.size:
        missing = "anomalous" if n_pos == 0 else "normal"
        warnings.warn(
            f"masks contain no {missing} pixel; pixel metrics are NaN",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        return dict.fromkeys(PIXEL_KEYS, math.nan)
    r = rank_pixels(masks, maps)
    return {
        "pixel_auroc": auroc_from(r),
        "pixel_ap": average_precision_from(r),
        "pixel_f1_max": f1_max_from(r)[0],
        "aupro": aupro_from(r, fpr_limit),
    }


def compute_metrics(
    labels: object, scores: object, masks: object = None, maps: object = None
) -> dict[str, float]:
    """Image metrics, plus pixel metrics when both ``masks`` and ``maps`` are given."""
    result = image_metrics(labels, scores)
    if masks is None and maps is None:
        return result
    if masks is None or maps is None:
        raise ValueError("pixel metrics need both masks and maps; got only one of them")
    m, a = check_masks_maps(masks, maps)
    n_images = np.shape(labels)[0]
    if m.shape[0] != n_images:
        raise ValueError(f"{n_images} image labels but {m.shape[0]} masks/maps")
    result.update(_pixel_metrics(m, a, fpr_limit=0.3, stacklevel=3))
    return result
