"""Good images plus a synthetic anomaly each, reproducible per (seed, epoch, index)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..dataset import ItemSource
from .base import Synthesizer


class SynthDataset:
    """Wraps an item source of good images (e.g. :class:`~defectscope.data.ImageDataset`).

    Item ``i`` is the base item plus ``synth_image`` (3, H, W) and ``synth_mask`` (H, W) float32,
    made with the generator ``np.random.default_rng([seed, epoch, i])``: the same (seed, epoch,
    index) always gives the same anomaly, in any order and any thread. Set ``epoch`` before each
    training epoch to get fresh anomalies.
    """

    def __init__(self, base: ItemSource, synthesizer: Synthesizer, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.base = base
        self.synthesizer = synthesizer
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for {length} items")
        index %= length
        item = dict(self.base[index])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        item["synth_image"], item["synth_mask"] = self.synthesizer(item["image"], rng)
        return item
