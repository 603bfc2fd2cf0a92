"""Reading a stored calibration back: every field checked, and the threshold recomputed from it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .thresholds import CONFORMAL, MAX_SCORES, MEAN_SIGMA, RECALL, RULES, calibrate, mean_sigma_threshold

if TYPE_CHECKING:
    from .thresholds import Calibration

_COMMON = ("rule", "threshold", "n_images", "good_scores", "defect_scores")
#: The fields each rule may store beside the common ones, and which of all it must store.
_RULE_FIELDS: dict[str, tuple[str, ...]] = {
    CONFORMAL: ("false_alarm_rate", "confidence"),
    MEAN_SIGMA: ("sigmas", "mean", "std", "max"),
    RECALL: ("target_recall",),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    CONFORMAL: ("threshold", "n_images", "false_alarm_rate", "good_scores"),
    MEAN_SIGMA: ("threshold", "n_images", "sigmas", "mean", "std", "max"),
    RECALL: ("threshold", "n_images", "target_recall", "good_scores", "defect_scores"),
}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(data: dict, key: str) -> float:
    value = data[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"calibration.{key} must be a finite number, got {_short(value)}")
    return float(value)


def _scores(data: dict, key: str, nonnegative: bool) -> list[float]:
    values = data[key]
    if not isinstance(values, list):
        raise ValueError(f"calibration.{key} must be a list of numbers, got {_short(values)}")
    if len(values) > MAX_SCORES:
        raise ValueError(f"calibration.{key} holds {len(values)} scores, more than {MAX_SCORES}")
    for i, value in enumerate(values):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"calibration.{key}[{i}] must be a finite number, got {_short(value)}")
        if nonnegative and value < 0:
            raise ValueError(f"calibration.{key}[{i}] is negative ({value}); this method's scores never are")
        if i and value < values[i - 1]:
            raise ValueError(f"calibration.{key} must be in ascending order (entry {i} is below entry {i - 1})")
    return [float(v) for v in values]


def parse_calibration(cls: type[Calibration], data: object, nonnegative_scores: bool) -> Calibration:
    """The :class:`Calibration` stored as ``data``; ValueError (TypeError for a non-object) naming the field."""
    if not isinstance(data, dict):
        raise TypeError(f"calibration must be an object or null, got {type(data).__name__}")
    rule = data.get("rule", MEAN_SIGMA)
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"calibration.rule: unknown threshold rule {str(rule)[:40]!r} (known: {', '.join(RULES)})")
    for key in data:
        if key not in _COMMON and key not in _RULE_FIELDS[rule]:
            raise ValueError(f"calibration.{str(key)[:40]}: unknown field for rule {rule}")
    for key in _REQUIRED[rule]:
        if key not in data:
            raise ValueError(f"calibration.{key}: missing")
    n = data["n_images"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"calibration.n_images must be an integer of at least 1, got {_short(n)}")
    threshold = _number(data, "threshold")
    good = _scores(data, "good_scores", nonnegative_scores) if "good_scores" in data else None
    defects = _scores(data, "defect_scores", nonnegative_scores) if "defect_scores" in data else []
    if good is not None and len(good) != n:
        raise ValueError(f"calibration.good_scores holds {len(good)} scores, n_images says {n}")
    setting = {key: _number(data, key) for key in _RULE_FIELDS[rule] if key in data}
    if good is None:
        calibration = _older_mean_sigma(cls, threshold, n, setting, nonnegative_scores)
    else:
        calibration = _recomputed(good, rule, defects, setting)
    for key in ("mean", "std", "max"):
        stored, recomputed = setting.get(key), getattr(calibration, key)
        if stored is not None and recomputed is not None and not math.isclose(stored, recomputed, rel_tol=1e-9):
            raise ValueError(f"calibration.{key} {stored} does not match the stored scores ({recomputed})")
    if not math.isclose(threshold, calibration.threshold, rel_tol=1e-9, abs_tol=1e-300):
        raise ValueError(
            f"calibration.threshold {threshold} does not follow from the stored scores "
            f"(rule {rule} gives {calibration.threshold})"
        )
    if nonnegative_scores and threshold <= 0:
        raise ValueError(
            f"calibration.threshold must be above 0 (this method's scores are never negative), got {threshold}"
        )
    return calibration


def _recomputed(good: list[float], rule: str, defects: list[float], setting: dict[str, float]) -> Calibration:
    """The calibration ``rule`` gives for the stored scores and setting."""
    keys = ("false_alarm_rate", "confidence", "sigmas", "target_recall")
    try:
        return calibrate(good, rule=rule, defect_scores=defects, **{k: v for k, v in setting.items() if k in keys})
    except ValueError as exc:
        raise ValueError(f"calibration: {exc}") from None


def _older_mean_sigma(
    cls: type[Calibration], threshold: float, n: int, setting: dict[str, Any], nonnegative_scores: bool
) -> Calibration:
    """A mean_sigma calibration stored with its statistics only (models saved before scores were kept)."""
    mean, std, top, sigmas = setting["mean"], setting["std"], setting["max"], setting["sigmas"]
    if std < 0:
        raise ValueError(f"calibration.std must not be negative, got {std}")
    if not 0 <= sigmas <= 10:
        raise ValueError(f"calibration.sigmas must be in [0, 10], got {sigmas}")
    slack = 1e-9 * max(abs(mean), abs(top))  # float rounding of the mean of equal scores
    if mean > top + slack:
        raise ValueError(f"calibration.mean {mean} is above calibration.max {top}")
    if n == 1 and (std != 0 or mean != top):
        raise ValueError("calibration of 1 image must have std 0 and mean equal to max")
    # Samuelson's inequality: no sample lies further than std * (n - 1) / sqrt(n) from its mean.
    if top - mean > std * (n - 1) / math.sqrt(n) * (1 + 1e-9) + slack:
        raise ValueError(f"calibration.max {top} is further above the mean {mean} than {n} scores with std {std} allow")
    if nonnegative_scores and mean < 0:
        raise ValueError(f"calibration.mean must not be negative (this method's scores are not), got {mean}")
    expected = mean_sigma_threshold(mean, std, top, sigmas)
    if not math.isfinite(expected):
        raise ValueError("calibration: the stored statistics give a threshold that is not finite")
    return cls(MEAN_SIGMA, expected, n, None, (), sigmas=sigmas, mean=mean, std=std, max=top)
