"""Run a fitted detector over a labelled test split: metrics plus one record per image."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import ImageDataset, Sample, iterate_batches
from .data.dataset import Batch
from .methods.base import Detector, Prediction
from .metrics import assess
from .metrics.verdicts import verdict_summary
from .records import Record

#: Sees each batch with its prediction; may return the overlay path written for each image.
BatchCallback = Callable[[Batch, Prediction], "list[str | None] | None"]


@dataclass
class Evaluation:
    """Everything a test run produced.

    ``curves`` holds thinned (x, y) curves for plots: image ``roc`` and ``pr`` and, with pixel
    metrics, ``pro`` up to FPR 0.3 (see :func:`~defectscope.metrics.compute_metrics_and_curves`).
    """

    metrics: dict[str, float]
    records: list[Record]
    images_per_second: float
    notes: list[str] = field(default_factory=list)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: False alarms, misses and confusion counts at the threshold (:func:`verdict_summary`).
    verdicts: dict[str, Any] | None = None


def evaluate(
    detector: Detector, samples: list[Sample], batch_size: int | None = None, on_batch: BatchCallback | None = None
) -> Evaluation:
    """Score every sample, compute image metrics and (where masks exist) pixel metrics.

    Pixel metrics need a mask for every defect image; when some are missing (image-level-only
    evaluation) they are skipped and a note says so. ``on_batch`` sees each batch with its
    prediction (used to write heat-map overlays without keeping all images in memory).
    """
    dataset = ImageDataset(samples, detector.image_size)
    labels, scores, records = [], [], []
    maps, masks, has_mask = [], [], []
    start = time.perf_counter()
    threshold = detector.calibration.threshold if detector.calibration else None
    rule = detector.calibration.rule if detector.calibration else None
    for batch in iterate_batches(dataset, batch_size or detector.batch_size, desc="testing"):
        pred = detector.predict(batch["image"])
        written = on_batch(batch, pred) if on_batch is not None else None
        labels.append(batch["label"].numpy())
        scores.append(pred.scores.numpy())
        maps.append(pred.maps.numpy().astype(np.float32))
        masks.append(batch["mask"].numpy())
        has_mask.append(batch["has_mask"].numpy())
        for i, path in enumerate(batch["path"]):
            record = Record.of(
                path,
                batch["category"][i],
                float(pred.scores[i]),
                float(pred.maps[i].max()),
                threshold,
                label=int(batch["label"][i]),
                defect_type=batch["defect_type"][i],
                rule=rule,
            )
            record.overlay = written[i] if written else None
            records.append(record)
    elapsed = time.perf_counter() - start
    y, s = np.concatenate(labels), np.concatenate(scores)
    notes: list[str] = []
    trusted = np.array([r.verdict != "error" for r in records], dtype=bool)
    if not trusted.all():
        notes.append(
            f"{int((~trusted).sum())} image(s) got the verdict error (non-finite score) and are left out of the metrics"
        )
        y, s = y[trusted], s[trusted]
        keep = np.flatnonzero(trusted)
        maps, masks, has_mask = (
            [np.concatenate(maps)[keep]],
            [np.concatenate(masks)[keep]],
            [np.concatenate(has_mask)[keep]],
        )
    names = [r.path for r, ok in zip(records, trusted) if ok]
    metrics, curves, metric_notes = assess(
        y, s, np.concatenate(masks), np.concatenate(maps), np.concatenate(has_mask), names
    )
    notes += metric_notes
    verdicts = verdict_summary(records)
    if verdicts is not None:
        metrics["accuracy_at_threshold"] = verdicts["accuracy"]
        metrics["false_alarm_rate"] = verdicts["false_alarms"]["rate"]
        metrics["miss_rate"] = verdicts["misses"]["rate"]
    speed = len(samples) / elapsed if elapsed > 0 else float("nan")
    return Evaluation(metrics, records, speed, notes, curves, verdicts)
