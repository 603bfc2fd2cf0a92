"""DDAD (Mousakhan et al., "Anomaly Detection with Conditioned Denoising Diffusion Models", arXiv 2305.15956).

A DDPM (T = 1000, linear betas 1e-4..0.02) learns good images. A test image y is noised to step
``t_start`` (paper: 250) and denoised in ``steps`` DDIM steps (paper: 10), each conditioned on y:

    eps_hat = eps_theta(x_t, t) - w * sqrt(1 - abar_t) * (y_t - x_t),
    y_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps_theta,

so the reconstruction stays close to the input where it is normal and becomes normal where it is
not.

Two spaces (``space``):

- ``"features"``, the CPU default: the DDPM denoises the frozen backbone's standardised feature
  maps (``layers`` s8 + s16 on the s8 grid, :mod:`.feature_space`), predicting the clean sample
  (``prediction="sample"``), and the map is ``1 - cos`` between the features of the input and of
  its reconstruction. At 64 px and a 600 s budget this is what reaches PaDiM-like accuracy on a
  CPU (BENCHMARKS.md, "DDAD and GLAD in feature space").
- ``"pixel"``, the paper's: the DDPM denoises images in [-1, 1] predicting the noise
  (``prediction="epsilon"``), and the map is ``v * max(Df) / max(Dp) * Dp + Df`` (see
  :mod:`.diffusion_detector`) with a domain-adapted extractor (:mod:`.domain_adaptation`, on
  pairs of good images and their ``w_da``-conditioned reconstructions).

UNets: ``unet="features"`` (base 64, three levels) is the feature-space default; in pixel space
``"ddad"`` is the paper's configuration (base 64 channels), ``"ddad_s"`` the small DDAD-S (base
32) and ``"small"`` (base 16, one residual block per level) what a CPU trains in minutes at 64
px. The defaults train only on steps below ``max_train_timestep=500`` (inference never starts
above step 400) and stop after a 600 s ``time_budget``. The paper on a GPU: ``space="pixel",
prediction="epsilon", image_size=256, unet="ddad", epochs=2000, time_budget=None,
max_train_timestep=None, ema_decay=0.999`` (blur 4, s8 + s16 as the defaults).

The unconditioned pixel baseline (plain DDIM reconstruction, pixel distance) is
``space="pixel", prediction="epsilon", w=0, distance="pixel", da_epochs=0``.
"""

from __future__ import annotations

import torch

from ..errors import DefectscopeError
from ..nn import diffusion as dm
from ..thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from .diffusion_detector import DiffusionDetector, Distance, PredictionKind, Space
from .params import base_params


class DDAD(DiffusionDetector):
    """Target-conditioned DDIM reconstruction with pixel + (domain-adapted) feature distances."""

    name = "ddad"
    export_unsupported = None

    def __init__(
        self,
        image_size: int = 64,
        space: Space = "features",
        prediction: PredictionKind = "sample",
        unet: str = "features",
        t_start: int = 250,
        steps: int = 10,
        w: float = 4.0,
        eta: float = 0.0,
        distance: Distance = "both",
        v: float = 1.0,
        blur_sigma: float = 4.0,
        da_epochs: int = 3,
        da_images: int | None = 128,
        w_da: float = 3.0,
        da_lambda: float = 0.1,
        da_lr: float = 1e-4,
        backbone: str = "efficientnet_lite0",
        layers: tuple[str, ...] = ("s8", "s16"),
        weights: str | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        max_train_timestep: int | None = 500,
        ema_decay: float = 0.995,
        epochs: int = 100,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        time_budget: float | None = 600.0,
        batch_size: int = 32,
        calibration_fraction: float = 0.1,
        threshold_rule: ThresholdRule = DEFAULT_RULE,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        false_alarm_confidence: float | None = None,
        target_recall: float = DEFAULT_TARGET_RECALL,
        threshold_sigmas: float = 3.0,
        seed: int = 0,
    ) -> None:
        super().__init__(**base_params(DDAD, locals()))
        if not 1 <= t_start <= num_train_timesteps:
            raise DefectscopeError(f"t_start must be in [1, {num_train_timesteps}], got {t_start}")
        if w < 0 or w_da < 0:
            raise DefectscopeError(f"w and w_da must be non-negative, got {w} and {w_da}")
        self.t_start = t_start
        self.w = w
        self.w_da = w_da

    def _conditioned(self, y: torch.Tensor, w: float) -> torch.Tensor:
        return dm.ddim_denoise(
            self.noise_model(), y, self.t_start, self.steps, self.abar, w=w, eta=self.eta, seed=self.seed
        )

    def _denoise(self, y: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self._conditioned(y, self.w)

    def _adaptation_reconstruction(self, images: torch.Tensor) -> torch.Tensor:
        """Domain adaptation pairs good images with their ``w_da``-conditioned reconstructions."""
        return self.to_image_space(self._conditioned(self.to_model_space(images), self.w_da))
