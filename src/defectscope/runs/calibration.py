"""``calibrate_run``: set the threshold of a fitted run again, from more images, without re-fitting.

The new threshold uses the model's stored held-out scores plus the scores of the new good images
(and labelled defects), or only the new ones with ``replace``. The images must be ones the model
was not fitted on; they are recorded so that ``test`` leaves them out. Only ``config.json`` is
rewritten (atomically), and the calibration it replaces is appended to its history.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Sample
from ..data.layouts import image_files
from ..data.sources import training_samples
from ..errors import DataError, DefectscopeError
from ..methods import Detector, load
from ..methods.model_file import save_calibration
from ..progress import Log, quiet
from ..thresholds import RECALL, Calibration, check_rule_setting, chosen_rule
from .info import run_info


@dataclass
class CalibrateResult:
    """The calibration before and after, and the images that changed it."""

    folder: Path
    before: Calibration | None
    after: Calibration
    n_new_good: int
    n_new_defects: int


def _setting(
    detector: Detector,
    rule: str | None,
    false_alarm_rate: float | None,
    sigmas: float | None,
    target_recall: float | None,
    confidence: float | None,
) -> dict[str, Any]:
    """The threshold parameters to calibrate with: the model's own, changed by what was given."""
    try:
        chosen = chosen_rule(
            rule,
            {
                "false_alarm_rate": false_alarm_rate,
                "false_alarm_confidence": confidence,
                "threshold_sigmas": sigmas,
                "target_recall": target_recall,
            },
        )
    except ValueError as exc:
        raise DefectscopeError(str(exc)) from None
    params = {
        "threshold_rule": chosen or detector.threshold_rule,
        "false_alarm_rate": detector.false_alarm_rate if false_alarm_rate is None else false_alarm_rate,
        "false_alarm_confidence": detector.false_alarm_confidence if confidence is None else confidence,
        "threshold_sigmas": detector.threshold_sigmas if sigmas is None else sigmas,
        "target_recall": detector.target_recall if target_recall is None else target_recall,
    }
    return params


def _fitted_images(detector: Detector) -> set[str]:
    """Real paths of the images the run was fitted on (or held out from them), and its labelled defects."""
    info = run_info(detector)
    if info is None:
        return set()
    paths = {os.path.realpath(p) for p in info.labelled_defects}
    for folder in info.data:
        try:
            paths |= {os.path.realpath(s.path) for s in training_samples(folder)}
        except DataError:
            continue  # the training folder is gone: nothing left to compare with
    return paths


def _new_samples(paths: Sequence[str | os.PathLike[str]], label: int, taken: set[str], what: str) -> list[Sample]:
    if not paths:
        return []
    samples = [Sample(p, label, p.parent.name if label else "good", None, "") for p in image_files(paths)]
    for sample in samples:
        real = os.path.realpath(sample.path)
        if real in taken:
            raise DataError(
                f"{sample.path}: already part of this model (fitted on, held out when it was fitted, or "
                f"counted by an earlier calibrate); {what} must be images it has not seen"
            )
    return samples


def calibrate_run(
    run: str | os.PathLike[str],
    good: Sequence[str | os.PathLike[str]] = (),
    defects: Sequence[str | os.PathLike[str]] = (),
    *,
    rule: str | None = None,
    false_alarm_rate: float | None = None,
    sigmas: float | None = None,
    target_recall: float | None = None,
    confidence: float | None = None,
    replace_scores: bool = False,
    batch_size: int | None = None,
    device: str = "cpu",
    log: Log = quiet,
) -> CalibrateResult:
    """Re-set the threshold of the run folder ``run`` and save it; returns the old and new calibration.

    ``good`` / ``defects`` are image files or folders (defect types are the folder names).
    ``rule`` and the rule settings default to the model's own; giving one setting chooses its
    rule. With ``replace_scores`` the stored held-out scores are dropped and only the new images
    count. Everything is checked before anything is scored; nothing is written on an error.
    """
    folder = Path(run)
    detector = load(folder).to(device)
    if batch_size is not None:
        detector.batch_size = batch_size
    params = _setting(detector, rule, false_alarm_rate, sigmas, target_recall, confidence)
    before = detector.calibration
    taken = _fitted_images(detector)
    if not replace_scores:
        taken |= {os.path.realpath(p) for p in detector.calibration_images}
    good_samples = _new_samples(good, 0, taken, "--good images")
    defect_samples = _new_samples(defects, 1, taken, "--defects images")
    stored_good: tuple[float, ...] = () if replace_scores or before is None else before.good_scores or ()
    stored_defects: tuple[float, ...] = () if replace_scores or before is None else before.defect_scores
    if before is not None and before.good_scores is None and not replace_scores:
        if not good_samples:
            raise DefectscopeError(
                f"{folder}: this model was saved without its held-out scores (an earlier defectscope); "
                "give good images it has not seen with --good DIR to calibrate it"
            )
        log("note: the model's own held-out scores were not stored; calibrating on the new good images only")
    if not stored_good and not good_samples:
        raise DefectscopeError("calibrate needs good images: give --good DIR (the model holds no held-out scores)")
    unchanged = all(getattr(detector, k) == v for k, v in params.items())
    if unchanged and not good_samples and not defect_samples and not replace_scores:
        raise DefectscopeError(
            "nothing to change: give --good / --defects images or a new setting (--false-alarm-rate, --rule, ...)"
        )
    try:
        check_rule_setting(
            params["threshold_rule"],
            params["false_alarm_rate"],
            params["threshold_sigmas"],
            params["target_recall"],
            params["false_alarm_confidence"],
        )
    except ValueError as exc:
        raise DefectscopeError(f"calibrate: {exc}") from None
    for key, value in params.items():
        setattr(detector, key, value)
    if params["threshold_rule"] == RECALL and not stored_defects and not defect_samples:
        raise DefectscopeError("the recall rule sets the threshold from labelled defects: give them with --defects DIR")
    if good_samples:
        log(f"scoring {len(good_samples)} good image(s)")
    new_good = detector.score_samples(good_samples, "scoring good images")
    if defect_samples:
        log(f"scoring {len(defect_samples)} defect image(s)")
    new_defects = detector.score_samples(defect_samples, "scoring defect images")
    after = detector.calibrate(
        np.concatenate([np.asarray(stored_good), new_good]), np.concatenate([np.asarray(stored_defects), new_defects])
    )
    detector.calibration = after
    if before is not None:
        entry = {k: v for k, v in before.summary().items() if k != "notes"}
        detector.calibration_history.append(
            {**entry, "replaced": datetime.now(UTC).isoformat(timespec="seconds"), "replaced_scores": replace_scores}
        )
    used = [str(s.path) for s in (*good_samples, *defect_samples)]
    detector.calibration_images = used if replace_scores else [*detector.calibration_images, *used]
    save_calibration(detector, folder)
    return CalibrateResult(folder, before, after, len(good_samples), len(defect_samples))
