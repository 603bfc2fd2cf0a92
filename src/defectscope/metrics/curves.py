"""Ranking metrics for binary labels: ROC / PR curves, AUROC, average precision, F1-max.

Definitions follow scikit-learn so numbers are comparable with published tables: one threshold
per distinct score, a sample is called anomalous when ``score >= threshold``, AUROC is the
trapezoidal area under the ROC curve, and AP is the step-wise sum ``sum_n (R_n - R_{n-1}) P_n``
(no interpolation). All inputs with one class only, no samples, NaN/inf scores or mismatched
shapes raise ``ValueError``.
"""

from __future__ import annotations

import numpy as np

from .ranking import Ranking, rank


def auroc_from(r: Ranking) -> float:
    """Area under the ROC curve, computed exactly in integer arithmetic then divided once."""
    tp = np.concatenate(([0], r.tp))
    fp = np.concatenate(([0], r.fp))
    twice_area = np.sum(np.diff(fp) * (tp[1:] + tp[:-1]))
    return float(twice_area / (2.0 * r.n_pos * r.n_neg))


def precision_recall_from(r: Ranking) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each threshold, highest threshold first."""
    # Every threshold is an observed score, so at least one sample is predicted positive.
    precision = r.tp / (r.tp + r.fp)
    recall = r.tp / r.n_pos
    return precision, recall


def average_precision_from(r: Ranking) -> float:
    """Step-wise AP: recall increments weighted by the precision where they happen."""
    precision, recall = precision_recall_from(r)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def f1_max_from(r: Ranking) -> tuple[float, float]:
    """Best F1 and its threshold (the highest one when several thresholds tie)."""
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P): exact ratios, so ties compare equal.
    f1 = 2.0 * r.tp / (r.tp + r.fp + r.n_pos)
    k = int(np.argmax(f1))
    return float(f1[k]), float(r.thresholds[k])


def auroc(labels: object, scores: object) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = anomalous)."""
    return auroc_from(rank(labels, scores))


def average_precision(labels: object, scores: object) -> float:
    """Average precision, ``sum_n (R_n - R_{n-1}) P_n`` over descending distinct thresholds."""
    return average_precision_from(rank(labels, scores))


def f1_max(labels: object, scores: object) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold giving it (anomalous when ``score >= t``)."""
    return f1_max_from(rank(labels, scores))


def roc_curve(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` with thresholds decreasing from ``inf``.

    Matches ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``: the first point is
    (0, 0) at threshold ``inf``, then one point per distinct score.
    """
    r = rank(labels, scores)
    fpr = np.concatenate(([0.0], r.fp / r.n_neg))
    tpr = np.concatenate(([0.0], r.tp / r.n_pos))
    thresholds = np.concatenate(([np.inf], r.thresholds.astype(np.float64)))
    return fpr, tpr, thresholds


def pr_curve(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve ``(precision, recall, thresholds)``, thresholds increasing.

    Matches ``sklearn.metrics.precision_recall_curve``: ``precision`` and ``recall`` have one
    more entry than ``thresholds``, the final point (1, 0) that has no threshold.
    """
    r = rank(labels, scores)
    precision, recall = precision_recall_from(r)
    return (
        np.concatenate((precision[::-1], [1.0])),
        np.concatenate((recall[::-1], [0.0])),
        r.thresholds[::-1].astype(np.float64),
    )


def thin_curve(x: np.ndarray, y: np.ndarray, n_points: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n_points`` vertices of the polyline ``(x, y)``, evenly spaced along its length.

    Lengths are measured with both axes scaled to their range, so steep and flat stretches are
    sampled alike; the first and last vertices are always kept. Meant for plots: a pixel-level
    curve with millions of vertices keeps its visible shape with a few hundred.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size <= n_points:
        return x, y
    dx = np.diff(x) / max(float(np.ptp(x)), 1e-12)
    dy = np.diff(y) / max(float(np.ptp(y)), 1e-12)
    length = np.concatenate(([0.0], np.cumsum(np.hypot(dx, dy))))
    keep = np.searchsorted(length, np.linspace(0.0, length[-1], n_points - 1))
    keep = np.unique(np.append(keep.clip(max=x.size - 1), x.size - 1))
    return x[keep], y[keep]
