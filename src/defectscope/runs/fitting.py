"""``fit_run``: fit a method on the good images of one or more categories into a run folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.sources import pick_labelled_defects, resolve_categories, training_samples
from ..errors import DefectscopeError, OutputError
from ..geometry import Geometry
from ..methods import METHODS, Detector
from ..methods.trained import TrainedDetector
from ..outputs import prepare_output_dir
from ..progress import Log, quiet
from .info import RunInfo

CONFIG_FILE = "config.json"


@dataclass
class FitResult:
    """A fitted run: the detector, where it was saved and what it was fitted on."""

    detector: Detector
    folder: Path
    info: RunInfo

    @property
    def threshold(self) -> float | None:
        return self.detector.calibration.threshold if self.detector.calibration else None


def build_detector(method: str, params: dict[str, Any] | None = None) -> Detector:
    """A new detector of ``method`` with constructor keywords ``params`` (checked by the method)."""
    if method not in METHODS:
        raise DefectscopeError(f"unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
    allowed = {spec.name for spec in METHODS[method].param_specs()}
    unknown = sorted(set(params or {}) - allowed)
    if unknown:
        raise DefectscopeError(f"{method} has no parameter {unknown[0]!r} (has: {', '.join(sorted(allowed))})")
    return METHODS[method](**(params or {}))


def _holds_model(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def fit_run(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    method: str = "patchcore",
    params: dict[str, Any] | None = None,
    category: str | None = None,
    categories: str | None = None,
    labelled_defects: int = 0,
    defects_from: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    geometry: Geometry | None = None,
    shards: Any = None,
    log: Log = quiet,
) -> FitResult:
    """Fit ``method`` on the good images of ``data`` and save the model to the run folder ``out``.

    ``data`` is a category folder, a root with ``category`` / ``categories`` ("all" or "a,b"),
    a folder of good images, or several of these for one unified model. ``labelled_defects`` K
    defect images per category (from ``defects_from``, else the test split) are given to
    methods that learn from them, and held out to measure the miss rate (and serve the recall
    threshold rule) by the others. ``out`` must be new, empty or an earlier run folder; one
    that already holds a fitted model is replaced only with ``overwrite``. Everything is checked
    before the fitting starts; ``log`` receives progress sentences. ``geometry`` (default: the
    square resize) says how images become the method's inputs and is saved with the model.
    ``shards`` (:class:`~defectscope.distributed.RayShards`) spreads the fit over workers, for the
    methods that support it (``distributed_fit``).
    """
    folders = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    detector = build_detector(method, params).to(device)
    if shards is not None:
        if not vars(type(detector)).get("distributed_fit", False):
            raise DefectscopeError(
                f"--engine ray: {method} is fitted in one process; `fit --engine ray` fits padim and patchcore"
            )
        detector.shards = shards  # type: ignore[attr-defined]
    if resume and not isinstance(detector, TrainedDetector):
        raise DefectscopeError(f"--resume: {method} is not trained in epochs, there is nothing to resume")
    category_dirs = resolve_categories(folders, category, categories)
    samples = [s for d in category_dirs for s in training_samples(d)]
    defects = (
        pick_labelled_defects(category_dirs, labelled_defects, detector.seed, defects_from) if labelled_defects else []
    )
    detector.check_threshold_rule(defects)
    if geometry is not None:
        detector.check_geometry(geometry, samples)
    detector.preflight()
    folder = Path(out)
    if _holds_model(folder) and not (overwrite or resume):
        raise OutputError(
            f"{folder}: already holds a fitted model; pass --overwrite to replace it (or choose another --out)"
        )
    prepare_output_dir(folder, overwrite=overwrite, what="run", allow=_holds_model)
    if defects:
        origin = defects_from or "each category's test split"
        use = (
            "to learn from"
            if detector.uses_labelled_defects
            else "held out to measure the miss rate at the threshold"
            + (" and set it" if detector.threshold_rule == "recall" else "")
        )
        log(
            f"using {labelled_defects} labelled defect image(s) per category from {origin} {use}; "
            "`defectscope test` leaves them out of the evaluation"
        )
    where = ", ".join(str(d) for d in category_dirs)
    shape = (geometry or detector.geometry).describe(detector.image_size)
    log(f"fitting {detector!r}\n  on {len(samples)} good images from {where}; input: {shape}")
    detector.fit(samples, defects=defects, checkpoint_dir=folder / "checkpoint", resume=resume, geometry=geometry)
    for note in detector.fit_notes():
        log(note)
    if detector.calibration is not None:
        for note in detector.calibration.notes:
            log(f"note: {note}")
    # Absolute but not resolved: category names are folder names, also when those are symlinks.
    info = RunInfo.of(detector, [Path(os.path.abspath(d)) for d in category_dirs])
    detector.run_info = info.to_dict()
    detector.save(folder)
    return FitResult(detector, folder, info)
