"""Evaluation metrics of the MVTec AD protocol: image and pixel AUROC / AP / F1-max, AUPRO.

``curves`` holds the ranking metrics (scikit-learn definitions), ``pro`` the per-region overlap,
``summary`` the metric sets an evaluation reports. Everything is numpy + scipy and exact.
"""

from .curves import (
    auroc,
    average_precision,
    f1_max,
    pr_curve,
    roc_curve,
    thin_curve,
)
from .pro import aupro, pro_curve
from .summary import (
    assess,
    compute_metrics,
    compute_metrics_and_curves,
    image_metrics,
    pixel_metrics,
)

__all__ = [
    "assess",
    "aupro",
    "auroc",
    "average_precision",
    "compute_metrics",
    "compute_metrics_and_curves",
    "f1_max",
    "image_metrics",
    "pixel_metrics",
    "pr_curve",
    "pro_curve",
    "roc_curve",
    "thin_curve",
]
