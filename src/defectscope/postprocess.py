"""Turning raw patch scores into anomaly maps, and calibrating a decision threshold.

Every method goes through these functions, so maps and thresholds mean the same thing whatever
the method.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel with radius 4 sigma."""
    radius = max(1, math.ceil(4.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps with reflected borders."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps)
    radius = kernel.numel() // 2
    x = maps[:, None]
    pad_h = min(radius, maps.shape[-2] - 1)
    pad_w = min(radius, maps.shape[-1] - 1)
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x
    x = F.conv2d(x, kernel[radius - pad_w : radius + pad_w + 1].view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else x
    x = F.conv2d(x, kernel[radius - pad_h : radius + pad_h + 1].view(1, 1, -1, 1))
    return x[:, 0]


def anomaly_maps(patch_scores: torch.Tensor, size: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Upsample (B, h, w) patch scores bilinearly to ``size`` and smooth them: (B, H, W)."""
    maps = F.interpolate(patch_scores[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma)


#: The threshold rule of :func:`calibrate`: threshold = max(mean + sigmas * std, max).
MEAN_SIGMA = "mean_sigma"


def mean_sigma_threshold(mean: float, std: float, top: float, sigmas: float) -> float:
    """max(mean + sigmas * std, highest held-out score)."""
    return max(mean + sigmas * std, top)


@dataclass(frozen=True)
class Calibration:
    """Statistics of anomaly scores on held-out good images, and the decision threshold derived from them.

    ``rule`` names how the threshold follows from the statistics, so that a stored calibration can
    be checked by recomputing it (:meth:`from_dict`). The one rule so far is :data:`MEAN_SIGMA`:
    threshold = max(mean + sigmas * std, highest held-out score), so a good image from the same
    process scores above it rarely, and never one of the held-out ones.
    """

    threshold: float
    mean: float
    std: float
    max: float
    n_images: int
    sigmas: float
    rule: str = MEAN_SIGMA

    def to_dict(self) -> dict:
        return asdict(self)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores divided by the threshold: above 1 means anomalous."""
        return scores / self.threshold

    @classmethod
    def from_dict(cls, data: object, *, nonnegative_scores: bool = False) -> Calibration:
        """A calibration read back from JSON, refused unless its threshold follows from its statistics.

        A dict without ``rule`` is read as :data:`MEAN_SIGMA`. ``nonnegative_scores`` says the
        method's scores are never negative, which rules out statistics below 0 and a threshold
        of 0 (every image anomalous). Raises ValueError (TypeError for a non-object) with a one-line
        message naming the field.
        """
        if not isinstance(data, dict):
            raise TypeError(f"calibration must be an object or null, got {type(data).__name__}")
        rule = data.get("rule", MEAN_SIGMA)
        if not isinstance(rule, str) or rule not in _RULE_FIELDS:
            raise ValueError(
                f"calibration.rule: unknown threshold rule {str(rule)[:40]!r} (known: {', '.join(_RULE_FIELDS)})"
            )
        fields = _RULE_FIELDS[rule]
        for key in data:
            if key not in fields and key not in ("threshold", "rule"):
                raise ValueError(f"calibration.{str(key)[:40]}: unknown field for rule {rule}")
        for key in ("threshold", *fields):
            if key not in data:
                raise ValueError(f"calibration.{key}: missing")
            value = data[key]
            if key == "n_images":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"calibration.n_images must be an integer of at least 1, got {_short(value)}")
            elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"calibration.{key} must be a finite number, got {_short(value)}")
        values: dict[str, Any] = {k: (data[k] if k == "n_images" else float(data[k])) for k in ("threshold", *fields)}
        calibration = cls(**values, rule=rule)
        calibration._check(nonnegative_scores)
        return calibration

    def _check(self, nonnegative_scores: bool) -> None:
        """Consistency of a mean_sigma calibration: statistics of real scores, and the threshold they give."""
        n, mean, std, top = self.n_images, self.mean, self.std, self.max
        if std < 0:
            raise ValueError(f"calibration.std must not be negative, got {std}")
        slack = 1e-9 * max(abs(mean), abs(top))  # float rounding of the mean of equal scores
        if mean > top + slack:
            raise ValueError(f"calibration.mean {mean} is above calibration.max {top}")
        if n == 1 and (std != 0 or mean != top):
            raise ValueError("calibration of 1 image must have std 0 and mean equal to max")
        # Samuelson's inequality: no sample lies further than std * (n - 1) / sqrt(n) from its mean.
        if top - mean > std * (n - 1) / math.sqrt(n) * (1 + 1e-9) + slack:
            raise ValueError(
                f"calibration.max {top} is further above the mean {mean} than {n} scores with std {std} allow"
            )
        if nonnegative_scores and mean < 0:
            raise ValueError(f"calibration.mean must not be negative (this method's scores are not), got {mean}")
        expected = mean_sigma_threshold(mean, std, top, self.sigmas)
        if not math.isfinite(expected):
            raise ValueError("calibration: the stored statistics give a threshold that is not finite")
        if not math.isclose(self.threshold, expected, rel_tol=1e-9, abs_tol=1e-300):
            raise ValueError(
                f"calibration.threshold {self.threshold} does not follow from the stored statistics "
                f"(rule {self.rule} gives {expected})"
            )
        if nonnegative_scores and self.threshold <= 0:
            raise ValueError(
                f"calibration.threshold must be above 0 (this method's scores are never negative), got {self.threshold}"
            )


#: The statistics each threshold rule stores next to the threshold.
_RULE_FIELDS: dict[str, tuple[str, ...]] = {MEAN_SIGMA: ("mean", "std", "max", "n_images", "sigmas")}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def calibrate(good_scores: np.ndarray | torch.Tensor, sigmas: float = 3.0) -> Calibration:
    """Decision threshold from anomaly scores of good images that the model did not fit on."""
    scores = np.asarray(good_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("calibration needs at least one held-out good image")
    mean = float(scores.mean())
    std = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
    top = float(scores.max())
    return Calibration(mean_sigma_threshold(mean, std, top, sigmas), mean, std, top, int(scores.size), sigmas)
