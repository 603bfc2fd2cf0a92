"""The settings of the defect generator, with the CPU defaults measured for them."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from ..errors import DefectscopeError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("sample", "epsilon", "v_prediction")


@dataclass
class GeneratorSettings:
    """Every option of the generator, with defaults measured on 2 shared CPU cores (MVTec bottle, 3 defect types).

    At the defaults fitting the image model and the mask model of a category takes about 8 minutes
    (``time_budget`` + ``mask_time_budget`` + loading); the budgets, not ``epochs``, end training.
    In that time the image UNet gets a few hundred optimiser steps: trained so briefly, a UNet
    predicting the noise samples coloured noise inside the mask, one predicting the clean image
    (``prediction="sample"``) smooth fills that follow the surrounding surface, and the (16, 32, 64)
    UNet looked no worse than (32, 64, 128) at half the cost. A pretrained model uses its own
    scheduler's noise schedule and prediction type instead of these.
    """

    image_size: int = 64  # side of the square the image model works at (pixels, or VAE input when pretrained)
    mask_size: int = 64  # side of the square the mask model works at
    block_channels: tuple[int, ...] = (16, 32, 64)  # image UNet width per resolution
    mask_block_channels: tuple[int, ...] = (8, 16, 32)  # mask UNet width per resolution
    layers_per_block: int = 1
    attention_levels: int = 2  # cross-attention blocks at this many of the lowest resolutions
    cross_attention_dim: int = 64
    attention_heads: int = 4
    anomaly_tokens: int = 4  # learned tokens per defect type (the official code's 4; the paper says 8)
    spatial_tokens: int = 4  # tokens the mask encoder makes from a mask (the paper's n = 4)
    outside_weight: float = 0.1  # loss weight outside the mask on defect images (0: the paper's masked loss)
    defect_share: float = 0.5  # share of defect images in an epoch (they are repeated to reach it)
    batch_size: int = 8
    lr: float = 1e-3
    epochs: int = 1000
    time_budget: float | None = 330.0  # seconds for the image model
    mask_epochs: int = 1000
    mask_time_budget: float | None = 120.0  # seconds for the mask model
    mask_flips: bool = True  # random flips of the training masks (more varied generated masks)
    ema_decay: float = 0.995
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # diffusers' names; a pretrained model's own schedule replaces these
    prediction: str = "sample"  # what the UNet predicts: "sample" (x0), "epsilon" or "v_prediction"
    sampling_steps: int = 50  # DDIM steps at generation
    eta: float = 0.0  # DDIM eta (0: deterministic steps)
    adaptive_attention: bool = True  # eq. 7 re-weighting at generation (overridable per call)
    prompt: str = "a photo of a {category}"  # text of the frozen text encoder (pretrained models only)
    category: str = "object"
    seed: int = 0

    def __post_init__(self) -> None:
        self.block_channels = tuple(self.block_channels)
        self.mask_block_channels = tuple(self.mask_block_channels)
        for name in (
            "image_size",
            "mask_size",
            "layers_per_block",
            "cross_attention_dim",
            "attention_heads",
            "anomaly_tokens",
            "batch_size",
            "epochs",
            "mask_epochs",
            "num_train_timesteps",
            "sampling_steps",
        ):
            if getattr(self, name) < 1:
                raise DefectscopeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise DefectscopeError(f"batch_size must be at least 2, got {self.batch_size}")
        for name in ("block_channels", "mask_block_channels"):
            channels = getattr(self, name)
            if not channels or any(c < 4 for c in channels):
                raise DefectscopeError(f"{name} must be widths of at least 4, got {list(channels)}")
        for name, size, channels in (
            ("image_size", self.image_size, self.block_channels),
            ("mask_size", self.mask_size, self.mask_block_channels),
        ):
            if size % 2 ** (len(channels) - 1):
                raise DefectscopeError(f"{name} {size} must be divisible by {2 ** (len(channels) - 1)}")
        if not 0 <= self.attention_levels <= len(self.block_channels):
            raise DefectscopeError(f"attention_levels must be in [0, {len(self.block_channels)}]")
        if self.spatial_tokens < 0:
            raise DefectscopeError(f"spatial_tokens must be at least 0, got {self.spatial_tokens}")
        if self.cross_attention_dim % self.attention_heads:
            raise DefectscopeError("cross_attention_dim must be divisible by attention_heads")
        if not 0.0 <= self.outside_weight <= 1.0:
            raise DefectscopeError(f"outside_weight must be in [0, 1], got {self.outside_weight}")
        if not 0.0 < self.defect_share < 1.0:
            raise DefectscopeError(f"defect_share must be in (0, 1), got {self.defect_share}")
        for name in ("time_budget", "mask_time_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise DefectscopeError(f"{name} must be positive seconds or None, got {value}")
        if not self.lr > 0:
            raise DefectscopeError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DefectscopeError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise DefectscopeError("beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise DefectscopeError(
                f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}"
            )
        if self.prediction not in PREDICTIONS:
            raise DefectscopeError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise DefectscopeError(f"eta must be in [0, 1], got {self.eta}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GeneratorSettings:
        """Settings from :meth:`to_dict`'s output; unknown keys or ill-typed values are a DefectscopeError."""
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key not in hints:
                raise DefectscopeError(f"unknown generator setting {key!r} (known: {', '.join(hints)})")
            if not _fits(hints[key], value):
                raise DefectscopeError(f"generator setting {key} must be {hints[key]}, got {value!r}")
        return cls(**values)


def _fits(annotation: Any, value: Any) -> bool:
    """Whether a JSON value is of a settings field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if annotation is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(args[0], v) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, annotation)
