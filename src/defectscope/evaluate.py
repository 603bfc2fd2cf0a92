"""Run a fitted detector over a labelled test split: metrics plus one record per image."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .data import Sample, mask_to_tensor
from .geometry import Geometry
from .geometry.inspect import Inspected
from .methods.base import Detector
from .metrics import assess
from .metrics.verdicts import verdict_summary
from .records import Record

#: Sees each scored image; may return the overlay path written for it.
ItemCallback = Callable[[Inspected], "str | None"]

#: Scores samples as ``Detector.inspect(samples, masks=True, native=native)`` does, elsewhere (``test --engine ray``).
Inspector = Callable[[list[Sample], bool], Iterable[Inspected]]

#: Where pixel metrics are computed: at each image's own size, or on the paper protocol's square.
PixelResolution = Literal["native", "square"]
PIXEL_RESOLUTIONS: tuple[PixelResolution, ...] = ("native", "square")


def default_resolution(geometry: Geometry) -> PixelResolution:
    """``square`` for models that squeeze whole images to a square (the papers' protocol), else ``native``."""
    return "square" if geometry.resize == "square" and geometry.tile is None else "native"


def metric_pair(item: Inspected, resolution: PixelResolution, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The (map, mask) pixel metrics compare for one image: both at its native size, or both on the
    image_size square (the map resized bilinearly, the mask by nearest neighbour, as papers do)."""
    height, width = item.size
    size = (image_size, image_size) if resolution == "square" else (height, width)
    mask = np.zeros(size, dtype=bool) if item.mask is None else item.mask
    if resolution == "square" and item.mask is not None:
        mask = mask_to_tensor(item.mask, image_size).numpy()
    amap = torch.from_numpy(item.map)
    if tuple(amap.shape) != size:
        shrink = amap.shape[0] > size[0] or amap.shape[1] > size[1]
        amap = F.interpolate(amap[None, None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0, 0]
    return amap.numpy(), mask


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
    #: Where the pixel metrics compared maps and masks (:data:`PIXEL_RESOLUTIONS`).
    pixel_resolution: PixelResolution = "square"


def evaluate(
    detector: Detector,
    samples: list[Sample],
    batch_size: int | None = None,
    on_item: ItemCallback | None = None,
    pixel_resolution: PixelResolution | None = None,
    inspector: Inspector | None = None,
) -> Evaluation:
    """Score every sample, compute image metrics and (where masks exist) pixel metrics.

    Pixel metrics need a mask for every defect image; when some are missing (image-level-only
    evaluation) they are skipped and a note says so. They compare maps and masks at
    ``pixel_resolution`` (default :func:`default_resolution`). ``on_item`` sees each scored image
    with its native pixels (used to write the report's images without keeping them in memory).
    ``inspector`` scores the samples instead of the detector itself (it must give what it gives).
    """
    resolution = pixel_resolution or default_resolution(detector.geometry)
    records: list[Record] = []
    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    has_mask: list[bool] = []
    start = time.perf_counter()
    threshold = detector.calibration.threshold if detector.calibration else None
    rule = detector.calibration.rule if detector.calibration else None
    native = on_item is not None
    scored = (
        inspector(samples, native)
        if inspector is not None
        else detector.inspect(samples, batch_size=batch_size, native=native, masks=True, desc="testing")
    )
    for item in scored:
        written = on_item(item) if on_item is not None else None
        amap, mask = metric_pair(item, resolution, detector.image_size)
        maps.append(amap)
        masks.append(mask)
        has_mask.append(item.has_mask)
        record = Record.of(
            item.path,
            item.sample.category,
            item.score,
            float(item.map.max()),
            threshold,
            label=item.sample.label,
            defect_type=item.sample.defect_type,
            rule=rule,
            engine=detector.engine_name,
        )
        record.overlay = written
        records.append(record)
    elapsed = time.perf_counter() - start
    y = np.array([r.label for r in records], dtype=np.int64)
    s = np.array([r.score for r in records], dtype=np.float32)
    notes: list[str] = []
    trusted = np.array([r.verdict != "error" for r in records], dtype=bool)
    if not trusted.all():
        notes.append(
            f"{int((~trusted).sum())} image(s) got the verdict error (non-finite score) and are left out of the metrics"
        )
        y, s = y[trusted], s[trusted]
        keep = np.flatnonzero(trusted).tolist()
        maps, masks, has_mask = [maps[i] for i in keep], [masks[i] for i in keep], [has_mask[i] for i in keep]
    names = [r.path for r, ok in zip(records, trusted) if ok]
    metrics, curves, metric_notes = assess(y, s, masks, maps, np.array(has_mask, dtype=bool), names)

    notes += metric_notes
    verdicts = verdict_summary(records)
    if verdicts is not None:
        metrics["accuracy_at_threshold"] = verdicts["accuracy"]
        metrics["false_alarm_rate"] = verdicts["false_alarms"]["rate"]
        metrics["miss_rate"] = verdicts["misses"]["rate"]
    speed = len(samples) / elapsed if elapsed > 0 else float("nan")
    return Evaluation(metrics, records, speed, notes, curves, verdicts, resolution)
