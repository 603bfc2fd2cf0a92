"""What a run was fitted on, stored in the model's ``config.json`` under ``"run"``."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..engines import EngineChoice, engine_facts, use_engine
from ..errors import ModelFileError
from ..methods import Detector, load
from ..progress import Log


@dataclass(frozen=True)
class RunInfo:
    """The data a model was fitted on and the software that fitted it.

    ``data`` are the category folders (absolute, symlinks kept: category names are folder
    names), in the order they were given; ``labelled_defects`` the defect images the model
    learnt from, which ``test`` always leaves out.
    """

    method: str
    data: list[str]
    categories: list[str]
    n_fit_images: int
    n_calibration_images: int
    image_size: int
    fit_date: str
    fit_seconds: float
    labelled_defects: list[str] = field(default_factory=list)
    resize: str = "square"
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, detector: Detector, category_dirs: list[Path]) -> RunInfo:
        info = detector.fit_info
        return cls(
            method=detector.name,
            data=[str(d) for d in category_dirs],
            categories=list(info.get("categories", [])),
            n_fit_images=int(info["n_fit_images"]),
            n_calibration_images=int(info["n_calibration_images"]),
            image_size=detector.image_size,
            fit_date=datetime.now(UTC).isoformat(timespec="seconds"),
            fit_seconds=float(info["fit_seconds"]),
            labelled_defects=list(info.get("labelled_defects", [])),
            resize="tiles" if detector.geometry.tile is not None else detector.geometry.resize,
            versions={
                "defectscope": __version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any, source: str) -> RunInfo:
        """Rebuild from ``config.json``'s ``"run"``; ``source`` names the file in errors."""
        if not isinstance(value, dict):
            raise ModelFileError(f"{source}: 'run' must be an object")
        expected = {f.name: f for f in cls.__dataclass_fields__.values()}
        unknown = sorted(set(value) - set(expected))
        if unknown:
            raise ModelFileError(f"{source}: unknown key run.{unknown[0]}")
        try:
            info = cls(**value)
        except TypeError as exc:
            raise ModelFileError(f"{source}: 'run' is incomplete ({exc})") from None
        checks = {
            "method": isinstance(info.method, str),
            "resize": isinstance(info.resize, str),
            "fit_date": isinstance(info.fit_date, str),
            "data": isinstance(info.data, list) and all(isinstance(d, str) for d in info.data),
            "categories": isinstance(info.categories, list) and all(isinstance(c, str) for c in info.categories),
            "labelled_defects": isinstance(info.labelled_defects, list)
            and all(isinstance(p, str) for p in info.labelled_defects),
            "versions": isinstance(info.versions, dict) and all(isinstance(v, str) for v in info.versions.values()),
            "n_fit_images": _count(info.n_fit_images),
            "n_calibration_images": _count(info.n_calibration_images),
            "image_size": _count(info.image_size),
            "fit_seconds": isinstance(info.fit_seconds, (int, float)) and not isinstance(info.fit_seconds, bool),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ModelFileError(f"{source}: run.{bad[0]} has the wrong type or value")
        return info


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_with_engine(
    run: str | os.PathLike[str], device: str, engine: EngineChoice | None, log: Log, detector: Detector | None = None
) -> Detector:
    """The run folder's detector (or ``detector``, already loaded from it) on ``device``, predicting with ``engine``."""
    detector = detector or load(run).to(device)
    if engine is not None:
        note = use_engine(detector, engine, run)
        if note:
            log(f"note: {note}")
    return detector


def model_facts(detector: Detector) -> dict[str, Any]:
    """What a test report's header says about the model: method, backbone, input geometry, fit."""
    info = run_info(detector)
    return {
        "method": detector.name,
        "backbone": getattr(detector, "backbone", None),
        "image_size": detector.image_size,
        "geometry": detector.geometry.describe(detector.image_size),
        "n_fit_images": detector.fit_info.get("n_fit_images"),
        "fitted_at": (info.fit_date or None) if info else None,
        "defectscope_version": info.versions.get("defectscope") if info else None,
        "categories": list(info.categories) if info else list(detector.fit_info.get("categories", [])),
        "engine": engine_facts(detector),
    }


def run_info(detector: Detector) -> RunInfo | None:
    """The run information of a loaded model; None for a model saved outside a run."""
    raw = getattr(detector, "run_info", None)
    if raw is None:
        # Models written before RunInfo existed recorded their data folders in fit_info.
        dirs = detector.fit_info.get("category_dirs") or (
            [detector.fit_info["data"]] if detector.fit_info.get("data") else []
        )
        if not dirs:
            return None
        info = detector.fit_info
        return RunInfo(
            method=detector.name,
            data=[str(d) for d in dirs],
            categories=list(info.get("categories", [])),
            n_fit_images=int(info.get("n_fit_images", 0)),
            n_calibration_images=int(info.get("n_calibration_images", 0)),
            image_size=detector.image_size,
            fit_date="",
            fit_seconds=float(info.get("fit_seconds", 0.0)),
            labelled_defects=list(info.get("labelled_defects", [])),
        )
    return RunInfo.from_dict(raw, "config.json")
