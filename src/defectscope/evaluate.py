"""Run a fitted detector over a labelled test split: metrics plus one record per image."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .data import ImageDataset, Sample, iterate_batches
from .methods.base import Detector, Prediction
from .metrics import compute_metrics_and_curves

BatchCallback = Callable[[dict[str, Any], Prediction], None]


@dataclass
class Evaluation:
    """Everything a test run produced.

    ``curves`` holds thinned (x, y) curves for plots: image ``roc`` and ``pr`` and, with pixel
    metrics, ``pro`` up to FPR 0.3 (see :func:`~defectscope.metrics.compute_metrics_and_curves`).
    """

    metrics: dict[str, float]
    records: list[dict[str, Any]]
    images_per_second: float
    notes: list[str] = field(default_factory=list)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def evaluate(detector: Detector, samples: list[Sample], batch_size: int | None = None,
             on_batch: BatchCallback | None = None) -> Evaluation:
    """Score every sample, compute image metrics and (where masks exist) pixel metrics.

    Pixel metrics need a mask for every defect image; when some are missing (image-level-only
    evaluation) they are skipped and a note says so. ``on_batch`` sees each batch with its
    prediction (used to write heat-map overlays without keeping all images in memory).
    """
    dataset = ImageDataset(samples, detector.image_size)
    labels, scores, records = [], [], []
    maps, masks, has_mask = [], [], []
    start = time.perf_counter()
    for batch in iterate_batches(dataset, batch_size or detector.batch_size, desc="testing"):
        pred = detector.predict(batch["image"])
        if on_batch is not None:
            on_batch(batch, pred)
        labels.append(batch["label"].numpy())
        scores.append(pred.scores.numpy())
        maps.append(pred.maps.numpy().astype(np.float32))
        masks.append(batch["mask"].numpy())
        has_mask.append(batch["has_mask"].numpy())
        verdicts = pred.verdicts.tolist() if pred.threshold is not None else [None] * len(batch["path"])
        for i, path in enumerate(batch["path"]):
            records.append({
                "path": path, "category": batch["category"][i], "defect_type": batch["defect_type"][i],
                "label": int(batch["label"][i]), "score": float(pred.scores[i]),
                "anomalous": verdicts[i], "max_pixel_score": float(pred.maps[i].max()),
            })
    elapsed = time.perf_counter() - start
    y, s = np.concatenate(labels), np.concatenate(scores)
    notes: list[str] = []
    metrics: dict[str, float] = {}
    curves: dict = {}
    if len(np.unique(y)) < 2:
        only = "defective" if y.size and y[0] == 1 else "good"
        notes.append(f"ranking metrics skipped: they need good and defective images, all {y.size} are {only}")
    elif np.concatenate(has_mask).all():
        metrics, curves = compute_metrics_and_curves(y, s, np.concatenate(masks), np.concatenate(maps))
    else:
        metrics, curves = compute_metrics_and_curves(y, s)
        notes.append("pixel metrics skipped: some defect images have no ground-truth mask (image-level only)")
    if detector.calibration is not None:
        judged = np.array([r["anomalous"] for r in records], dtype=bool)
        metrics["accuracy_at_threshold"] = float((judged == (y == 1)).mean())
    return Evaluation(metrics, records, len(samples) / elapsed if elapsed > 0 else float("nan"), notes, curves)
