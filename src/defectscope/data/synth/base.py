"""The synthesiser contract and the small checks every synthesiser shares."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Synthesizer(Protocol):
    """Turns a good image into an anomalous one plus the exact mask of the pixels it changed.

    ``image`` is (3, H, W) float in [0, 1]; the result is the anomalous image (3, H, W) in [0, 1]
    and a float32 (H, W) mask in {0, 1}. Pixels outside the mask are bit-identical to the input,
    pixels inside it differ by at least one 8-bit grey level. All randomness comes from ``rng``,
    so equal generator states give equal results.
    """

    kind: str

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


def check_image(image: torch.Tensor, what: str = "image") -> None:
    """Raise ValueError unless ``image`` is a floating (3, H, W) tensor."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{what} must be a float (3, H, W) tensor in [0, 1], got {shape}")


def no_anomaly(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image unchanged (a copy) and an all-zero mask."""
    return image.clone(), torch.zeros(image.shape[1:], dtype=torch.float32)


class Sometimes:
    """Applies ``synthesizer`` with chance ``probability``; otherwise returns the image unchanged and an empty mask."""

    def __init__(self, synthesizer: Synthesizer, probability: float) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.synthesizer = synthesizer
        self.probability = float(probability)
        self.kind = synthesizer.kind

    def __repr__(self) -> str:
        return f"Sometimes({self.synthesizer!r}, probability={self.probability})"

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if rng.random() >= self.probability:
            check_image(image)
            return no_anomaly(image)
        return self.synthesizer(image, rng)
