"""``evaluate_run``: score labelled test images with a fitted run and write its results.

A unified run (one model over several categories) is tested category by category, each in its
own sub-folder, and summarised with per-category and mean metrics. Labelled defect images the
model was fitted with are always left out, and the result says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import Sample, folder_samples
from ..data.sources import labelled_samples, resolve_categories
from ..engines import EngineChoice
from ..errors import DataError, DefectscopeError
from ..evaluate import Inspector, PixelResolution, evaluate
from ..geometry.inspect import Inspected
from ..methods import Detector
from ..outputs import StagedFiles, atomic_write_json, json_text, prepare_output_dir
from ..progress import Log, quiet
from ..records import NO_THRESHOLD_NOTE, Record, format_records
from ..report.html import write_report
from ..report.images import ReportImages
from .info import RunInfo, load_with_engine, model_facts, run_info

if TYPE_CHECKING:
    from ..distributed.ray_inspect import RayOptions


@dataclass
class CategoryResult:
    """The evaluation of one test set (one category of a unified run, or the only one)."""

    name: str | None
    data: str
    folder: Path
    records: list[Record]
    metrics: dict[str, float]
    notes: list[str]
    images_per_second: float
    threshold: float | None
    report: Path
    #: The threshold's rule and bound (:meth:`Calibration.summary`); None without a threshold.
    calibration: dict[str, Any] | None = None
    #: False alarms, misses and confusion counts at the threshold (:func:`verdict_summary`).
    verdicts: dict[str, Any] | None = None

    @property
    def n_errors(self) -> int:
        return sum(r.verdict == "error" for r in self.records)


@dataclass
class EvalResult:
    """Everything ``evaluate_run`` produced; ``mean_metrics`` for runs over several categories."""

    folder: Path
    parts: list[CategoryResult]
    mean_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def n_errors(self) -> int:
        return sum(p.n_errors for p in self.parts)

    @property
    def records(self) -> list[Record]:
        return [r for p in self.parts for r in p.records]


def dirs_to_test(
    data: str | os.PathLike[str] | None, category: str | None, categories: str | None, info: RunInfo | None
) -> list[Path]:
    """The category folders to test: ``data`` as given, a root narrowed to the model's categories,
    or (without ``data``) the folders the run was fitted on."""
    if data is None:
        if category is not None or categories is not None:
            raise DefectscopeError("--category / --categories choose from a dataset root: give that root as DATA too")
        if info is None or not info.data:
            raise DefectscopeError("no test data: pass DATA (the model does not record where it was fitted)")
        return [Path(p) for p in info.data]
    if category is not None or categories is not None:
        return resolve_categories([data], category, categories)
    try:
        every = resolve_categories([data], None, "all")
    except DataError:
        return resolve_categories([data])  # a category folder itself (or a plain folder: refused later)
    fitted = [p for p in every if info and p.name in info.categories]
    if not fitted:
        names = ", ".join(p.name for p in every)
        known = ", ".join(info.categories) if info and info.categories else "none recorded"
        raise DataError(
            f"{data}: holds the categories {names}, none of which this model was fitted on "
            f"({known}); choose one with --category"
        )
    return fitted


def _without_model_images(
    samples: list[Sample], info: RunInfo | None, calibration_images: list[str]
) -> tuple[list[Sample], list[str]]:
    """``samples`` without the labelled defects the model was fitted with and the images that set its threshold."""
    learnt = {os.path.realpath(p) for p in (info.labelled_defects if info else [])}
    calibrated = {os.path.realpath(p) for p in calibration_images} - learnt
    kept, notes = samples, []
    for used, text in (
        (learnt, "labelled defect image(s) the model was fitted with"),
        (calibrated, "image(s) that `defectscope calibrate` scored into the threshold"),
    ):
        before = len(kept)
        kept = [s for s in kept if os.path.realpath(s.path) not in used]
        if len(kept) < before:
            notes.append(f"{before - len(kept)} {text} are left out of this evaluation")
    return kept, notes


def _evaluate_one(
    detector: Detector,
    samples: list[Sample],
    source: str,
    name: str | None,
    folder: Path,
    run: str,
    notes: list[str],
    overlays: bool,
    batch_size: int | None,
    pixel_resolution: PixelResolution | None,
    log: Log,
    inspector: Inspector | None,
) -> CategoryResult:
    log(f"testing {run} on {len(samples)} images from {source}")
    threshold = detector.calibration.threshold if detector.calibration else None
    writer = ReportImages(folder, [str(s.path) for s in samples], threshold) if overlays else None
    try:
        result = evaluate(
            detector,
            samples,
            batch_size,
            on_item=writer.add if writer else None,
            pixel_resolution=pixel_resolution,
            inspector=inspector,
        )
        notes = notes + result.notes + ([NO_THRESHOLD_NOTE] if threshold is None else [])
        calibration = detector.calibration.summary() if detector.calibration else None
        summary = {
            "run": run,
            "data": source,
            "model": model_facts(detector),
            "n_images": len(samples),
            "n_defective": sum(s.label for s in samples),
            "n_errors": sum(r.verdict == "error" for r in result.records),
            "images_per_second": round(result.images_per_second, 2),
            "threshold": threshold,
            "calibration": calibration,
            "metrics": result.metrics,
            "pixel_resolution": result.pixel_resolution if result.metrics.get("pixel_auroc") is not None else None,
            "verdicts": result.verdicts,
            "notes": notes,
        }
        with StagedFiles() as staged:  # the three files replace earlier ones together, or not at all
            staged.stage(folder / "metrics.json", json_text(summary))
            staged.stage(folder / "predictions.csv", format_records(result.records, "csv", labelled=True))
            report = write_report(
                folder,
                summary,
                result.records,
                result.curves,
                with_images=writer is not None,
                with_reconstructions=bool(writer and writer.with_reconstructions),
                write=staged.stage,
            )
            if writer is not None:
                writer.commit()
            staged.commit()
        return CategoryResult(
            name,
            source,
            folder,
            result.records,
            result.metrics,
            notes,
            result.images_per_second,
            threshold,
            report,
            calibration,
            result.verdicts,
        )
    finally:
        if writer is not None:
            writer.discard()  # nothing left after a commit


def evaluate_run(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    *,
    category: str | None = None,
    categories: str | None = None,
    good: str | os.PathLike[str] | None = None,
    defects: str | os.PathLike[str] | None = None,
    masks: str | os.PathLike[str] | None = None,
    image_level_only: bool = False,
    out: str | os.PathLike[str] | None = None,
    overlays: bool = True,
    batch_size: int | None = None,
    pixel_resolution: PixelResolution | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    log: Log = quiet,
    detector: Detector | None = None,
    engine: EngineChoice | None = None,
    ray: RayOptions | None = None,
) -> EvalResult:
    """Test the run folder ``run`` on labelled images and write metrics, predictions and a report.

    The test set is ``data`` (a category folder, or a root: the model's categories in it), the
    plain folders ``good`` / ``defects`` / ``masks``, or by default what the run was fitted on.
    Results go to ``out`` (default ``RUN/test``; a folder holding other files is refused unless
    ``overwrite``); with several categories, one sub-folder per category plus the mean. Pixel
    metrics compare maps and masks at ``pixel_resolution`` (``native`` or ``square``; default
    :func:`~defectscope.evaluate.default_resolution` of the model's geometry). ``engine`` (default:
    torch) says what computes the predictions (:mod:`defectscope.engines`); with ``ray`` the images are
    scored on a Ray cluster (:mod:`defectscope.distributed.ray_inspect`), each worker with ``ray.engine``,
    and everything else is done here as without it.
    """
    inspector: Inspector | None = None
    if ray is not None:
        from ..distributed.ray_inspect import inspect_ray

        if detector is not None:
            raise DefectscopeError("--engine ray loads the run folder on every worker: pass the run, not a detector")
        options = ray

        def inspector(samples: list[Sample], native: bool) -> Iterator[Inspected]:
            return inspect_ray(run, samples, options, native=native, batch_size=batch_size, device=device)

    detector = load_with_engine(run, device, engine if ray is None else None, log, detector)
    info = run_info(detector)
    folder = Path(out) if out is not None else Path(run) / "test"
    sets: list[tuple[str | None, str, list[Sample]]]
    if good is None and (defects is not None or masks is not None):
        raise DefectscopeError("--defects / --masks: a plain-folder test set needs its good images (--good DIR)")
    if good is not None and (data is not None or category is not None or categories is not None):
        raise DefectscopeError(
            f"--good {good}: a plain-folder test set replaces DATA, --category and --categories; give one or the other"
        )
    if masks is not None and defects is None:
        raise DefectscopeError(f"--masks {masks}: masks belong to defect images; give those with --defects DIR")
    if good is not None:
        sets = [(None, str(Path(good).parent), folder_samples(good, defects, masks, image_level_only))]
    else:
        dirs = dirs_to_test(data, category, categories, info)
        named = len(dirs) > 1
        sets = [(d.name if named else None, str(d), labelled_samples(d, None, image_level_only)) for d in dirs]
    prepare_output_dir(folder, overwrite=overwrite, what="test results")
    parts = []
    for name, source, samples in sets:
        kept, notes = _without_model_images(samples, info, detector.calibration_images)
        if not kept:
            raise DataError(f"{source}: no test images left once the images the model has seen are left out")
        sub = folder / name if name else folder
        if name:
            prepare_output_dir(sub, overwrite=overwrite, what="test results")
            log(f"\n== {name} ==")
        parts.append(
            _evaluate_one(
                detector,
                kept,
                source,
                name,
                sub,
                str(run),
                notes,
                overlays,
                batch_size,
                pixel_resolution,
                log,
                inspector,
            )
        )
    result = EvalResult(folder, parts)
    if len(parts) > 1:
        keys = sorted({k for p in parts for k in p.metrics})
        result.mean_metrics = {k: float(np.mean([p.metrics[k] for p in parts if k in p.metrics])) for k in keys}
        atomic_write_json(
            folder / "metrics.json",
            {
                "run": str(run),
                "categories": [p.name for p in parts],
                "mean_metrics": result.mean_metrics,
                "n_errors": result.n_errors,
                "per_category": {p.name: p.metrics for p in parts},
            },
        )
    return result
