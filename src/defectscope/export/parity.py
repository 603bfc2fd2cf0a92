"""Parity of an engine with the torch model: the same images through both, the largest differences."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.base import Detector, Engine

#: What an fp32 export must meet: scores relative, maps absolute after dividing by the threshold.
SCORE_RTOL, MAP_ATOL = 1e-4, 1e-3


@dataclass(frozen=True)
class Parity:
    n_images: int
    score_rel: float  # max |s_engine - s_torch| / max(|s_torch|, |threshold|, tiny)
    map_abs: float  # max |m_engine - m_torch| / threshold (or / max |m_torch| without one)
    verdicts_equal: bool

    @property
    def within_bounds(self) -> bool:
        return self.score_rel <= SCORE_RTOL and self.map_abs <= MAP_ATOL and self.verdicts_equal

    def describe(self) -> str:
        return (
            f"{self.n_images} images: scores within {self.score_rel:.1e} (relative), maps within {self.map_abs:.1e} "
            f"(of the threshold), verdicts {'identical' if self.verdicts_equal else 'DIFFER'}"
        )


def compare(detector: Detector, engine: Engine, images: torch.Tensor) -> Parity:
    """Run ``images`` (B, 3, S, S) through the detector's torch code and through ``engine``."""
    saved = detector.engine
    try:
        detector.engine = None
        ours = detector.predict(images)
        detector.engine = engine
        theirs = detector.predict(images)
    finally:
        detector.engine = saved
    tiny = torch.finfo(torch.float32).tiny
    # relative to the score, or to the threshold where a signed score (a logit) sits near 0
    scale_s = ours.scores.abs().clamp_min(abs(ours.threshold or 0.0)).clamp_min(tiny)
    score_rel = ((theirs.scores - ours.scores).abs() / scale_s).max().item()
    scale = ours.threshold if ours.threshold else ours.maps.abs().max().clamp_min(tiny).item()
    map_abs = (theirs.maps - ours.maps).abs().max().item() / abs(scale)
    same = ours.threshold is None or bool(torch.equal(ours.verdicts, theirs.verdicts))
    return Parity(len(images), score_rel, map_abs, same)
