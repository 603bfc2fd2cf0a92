"""The metric sets reported for an evaluation run: image-level, pixel-level, or both.

Image metrics need both good and defective test images and raise ValueError otherwise. Pixel
metrics return NaN (with a RuntimeWarning) when the masks hold no anomalous pixel (or no normal
pixel): a test split without pixel annotations still gets its image metrics instead of failing.
:func:`assess` is what an evaluation run calls: it never raises or warns for a property of the
data, but computes what is defined and says in notes what was skipped or how an odd case counts.
"""

from __future__ import annotations

import math
import warnings
from typing import cast

import numpy as np
from numpy.typing import ArrayLike

from .curves import (
    auroc_from,
    average_precision_from,
    f1_max_from,
    precision_recall_from,
    thin_curve,
)
from .pixels import Pixels, check_masks_maps, count_pixels, image_flags
from .pro import aupro_from, pro_points, rank_pixels
from .ranking import Ranking, rank

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
    """Pixel AUROC, AP, F1-max and AUPRO of ``maps`` against ``masks``.

    Both are (N, H, W) arrays or sequences of N 2-D arrays, one per image, whose shapes may
    differ between images (each mask shaped like its map). All four come from one ranking of all
    pixels. NaN for every value (and a RuntimeWarning) when the masks contain only one class.
    """
    m, a = check_masks_maps(masks, maps)
    return _pixel_metrics(m, a, fpr_limit, stacklevel=3)[0]


def _pixel_metrics(
    masks: Pixels, maps: Pixels, fpr_limit: float, stacklevel: int
) -> tuple[dict[str, float], Ranking | None]:
    """Pixel metrics and the ranking they came from (None when the masks hold one class)."""
    n_pos, n_neg = count_pixels(masks)
    if n_pos == 0 or n_neg == 0:
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


def compute_metrics(labels: object, scores: object, masks: object = None, maps: object = None) -> dict[str, float]:
    """Image metrics, plus pixel metrics when both ``masks`` and ``maps`` are given.

    ``masks`` and ``maps`` are (N, H, W) arrays or sequences of N 2-D arrays (see :func:`pixel_metrics`).
    """
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
    m, a = _checked_pixels(masks, maps, np.shape(cast(ArrayLike, labels))[0])  # labels validated by rank()
    pixel, ranking = _pixel_metrics(m, a, PRO_FPR_LIMIT, stacklevel=4)
    result.update(pixel)
    if n_points is not None and ranking is not None:
        curves["pro"] = thin_curve(*_clip_curve(*pro_points(ranking), PRO_FPR_LIMIT), n_points)
    return result, curves


def _checked_pixels(masks: object, maps: object, n_images: int) -> tuple[Pixels, Pixels]:
    m, a = check_masks_maps(masks, maps)
    if len(m) != n_images:
        raise ValueError(f"{n_images} image labels but {len(m)} masks/maps")
    return m, a


def _clip_curve(x: np.ndarray, y: np.ndarray, x_max: float) -> Curve:
    """The part of a curve with ``x <= x_max`` (x non-decreasing), ending exactly at ``x_max``."""
    k = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < x_max:
        y_end = ys[-1] + (y[k] - ys[-1]) * (x_max - xs[-1]) / (x[k] - xs[-1])
        xs, ys = np.append(xs, x_max), np.append(ys, y_end)
    return xs, ys


#: At most this many images are named one by one in the notes of one kind; the rest are counted.
NAMED_IN_NOTES = 10


def _named_notes(names: list[str], text: str, kind: str) -> list[str]:
    """``"<name>: <text>"`` for the first :data:`NAMED_IN_NOTES` names, then one count of the rest."""
    notes = [f"{name}: {text}" for name in names[:NAMED_IN_NOTES]]
    if len(names) > NAMED_IN_NOTES:
        notes.append(f"{len(names) - NAMED_IN_NOTES} more {kind} not named here")
    return notes


def assess(
    labels: object,
    scores: object,
    masks: object = None,
    maps: object = None,
    has_mask: object = None,
    names: list[str] | None = None,
    n_points: int = 300,
) -> tuple[dict[str, float], dict[str, Curve], list[str]]:
    """Metrics, curves and notes of an evaluation, skipping what the data leaves undefined.

    ``masks`` and ``maps`` are (N, H, W) arrays or sequences of N 2-D arrays (one per image, sizes
    may differ). ``has_mask`` (N,) is False for images whose pixels must not be scored (defects
    without a mask); ``names`` (N,) name the images in the notes. Image metrics are skipped with
    a note when only one class or a non-finite score is present; pixel metrics when a defect image
    has no mask, when a map holds a non-finite value, or when every defect image's mask is empty.
    A defect image with an empty mask still counts as defective for the image metrics and adds no
    defective pixel to the pixel metrics; a note names it.
    """
    y, s = np.asarray(labels), np.asarray(scores)
    n = int(y.shape[0]) if y.ndim else 0
    names = [str(i) for i in range(n)] if names is None else list(names)
    if n == 0:
        return {}, {}, ["metrics skipped: no image was scored"]
    if len(np.unique(y)) < 2:
        only = "defective" if y[0] == 1 else "good"
        return {}, {}, [f"ranking metrics skipped: they need good and defective images, all {n} are {only}"]
    finite = np.isfinite(s)
    if not finite.all():
        skipped = f"ranking metrics skipped: {int((~finite).sum())} image(s) have a non-finite score"
        bad = [names[i] for i in np.flatnonzero(~finite)]
        return {}, {}, [skipped, *_named_notes(bad, "non-finite score", "images with a non-finite score")]
    if masks is None or maps is None:
        metrics, curves = compute_metrics_and_curves(y, s, n_points=n_points)
        return metrics, curves, []
    if has_mask is not None and not np.asarray(has_mask).all():
        metrics, curves = compute_metrics_and_curves(y, s, n_points=n_points)
        return (
            metrics,
            curves,
            ["pixel metrics skipped: some defect images have no ground-truth mask (image-level only)"],
        )
    m, a = _checked_pixels(masks, maps, n)
    marked, finite_maps = image_flags(m, a)
    defect = y == 1
    empty = defect & ~marked
    notes: list[str] = []
    pixels = True
    if empty[defect].all():
        notes.append(
            f"pixel metrics skipped: the ground-truth masks of all {int(defect.sum())} defect images are empty "
            "(no defective pixel); they still count as defective for the image metrics"
        )
        pixels = False
    elif empty.any():
        notes += _named_notes(
            [names[i] for i in np.flatnonzero(empty)],
            "defect image with an empty ground-truth mask: it counts as defective for the image metrics "
            "and adds no defective pixel to the pixel metrics",
            "defect images with an empty mask",
        )
    if pixels and not finite_maps.all():
        notes.append(f"pixel metrics skipped: {int((~finite_maps).sum())} anomaly map(s) hold non-finite values")
        notes += _named_notes(
            [names[i] for i in np.flatnonzero(~finite_maps)],
            "anomaly map holds non-finite values",
            "images with non-finite maps",
        )
        pixels = False
    if not pixels:
        metrics, curves = compute_metrics_and_curves(y, s, n_points=n_points)
        return metrics, curves, notes
    metrics, curves = compute_metrics_and_curves(y, s, m, a, n_points=n_points)
    return metrics, curves, notes
