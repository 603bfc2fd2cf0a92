"""``predict_run``: score image files, folders or category folders with a fitted run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import Sample
from ..data.layouts import image_files, mvtec_samples
from ..data.sources import resolve_categories
from ..engines import EngineChoice
from ..errors import DataError
from ..geometry.inspect import Inspected
from ..methods import Detector
from ..outputs import atomic_save_image, prepare_output_dir
from ..progress import Log, quiet
from ..records import Record
from ..report.images import heat_overlay
from ..report.overlay import unique_names
from .info import load_with_engine, run_info


@dataclass
class PredictResult:
    """Per-image records, in the order the images were named."""

    records: list[Record]
    heatmaps: Path | None

    @property
    def n_errors(self) -> int:
        return sum(r.verdict == "error" for r in self.records)


def _category_folders(path: Path, fitted: list[str]) -> list[Path] | None:
    """The category folders ``path`` stands for (itself, or those of a root the model was fitted on);
    None when it is a plain folder or a file."""
    if not path.is_dir():
        return None
    if (path / "test").is_dir() and ((path / "train").is_dir() or (path / "ground_truth").is_dir()):
        return [path]
    try:
        every = resolve_categories([path], None, "all")
    except DataError:
        return None
    chosen = [p for p in every if p.name in fitted]
    if not chosen:
        raise DataError(
            f"{path}: holds the categories {', '.join(p.name for p in every)}, none of which this model "
            f"was fitted on ({', '.join(fitted) or 'none recorded'}); name a category folder"
        )
    return chosen


def prediction_samples(paths: Sequence[str | os.PathLike[str]], categories: list[str]) -> list[Sample]:
    """What ``predict`` scores: image files and folders of images as named (see
    :func:`~defectscope.data.layouts.image_files`), and for an MVTec-layout category folder (or a
    root of the model's categories) every image of its test split."""
    default = categories[0] if len(categories) == 1 else None
    samples: list[Sample] = []
    plain: list[str | os.PathLike[str]] = []

    def flush() -> None:
        if not plain:
            return
        samples.extend(Sample(p, 0, "unknown", None, default or "") for p in image_files(plain))
        plain.clear()

    for raw in paths:
        folders = _category_folders(Path(raw).expanduser(), categories)
        if folders is None:
            plain.append(raw)
            continue
        flush()
        for folder in folders:
            samples += [Sample(s.path, 0, "unknown", None, s.category) for s in mvtec_samples(folder, "test", True)]
    flush()
    return samples


def prediction_record(detector: Detector, item: Inspected) -> Record:
    """The record ``predict`` writes for one inspected image."""
    threshold = detector.calibration.threshold if detector.calibration else None
    rule = detector.calibration.rule if detector.calibration else None
    category = item.sample.category or None
    return Record.of(
        item.path, category, item.score, float(item.map.max()), threshold, rule=rule, engine=detector.engine_name
    )


def predict_run(
    run: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]],
    *,
    heatmaps: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    detector: Detector | None = None,
    engine: EngineChoice | None = None,
    log: Log = quiet,
) -> PredictResult:
    """Score every image ``paths`` stand for with the run folder ``run``.

    With ``heatmaps``, an overlay per image is written there at the image's own size (its region of
    interest, for a model with one; distinct names also for images of the same name from different
    folders); that folder is checked before any image is scored. ``engine`` (default: torch) says
    what computes the predictions (:mod:`defectscope.engines`).
    """
    detector = load_with_engine(run, device, engine, log, detector)
    info = run_info(detector)
    samples = prediction_samples(paths, info.categories if info else [])
    folder = prepare_output_dir(heatmaps, overwrite=overwrite, what="heat maps") if heatmaps is not None else None
    names = dict(zip((str(s.path) for s in samples), unique_names([str(s.path) for s in samples])))
    records: list[Record] = []
    for item in detector.inspect(samples, batch_size=batch_size, native=folder is not None, desc="predicting"):
        record = prediction_record(detector, item)
        if folder is not None:
            target = folder / f"{names[item.path]}_heatmap.png"
            assert item.image is not None  # inspected with native pixels
            atomic_save_image(target, heat_overlay(item.image, item.map, record.threshold))
            record.overlay = str(target)
        records.append(record)
    return PredictResult(records, folder)
