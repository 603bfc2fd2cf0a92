"""DDAD (Mousakhan et al., "Anomaly Detection with Conditioned Denoising Diffusion Models", arXiv 2305.15956).

A DDPM (T = 1000, linear betas 1e-4..0.02) learns good images. A test image y is noised to step
``t_start`` (paper: 250) and denoised in ``steps`` DDIM steps (paper: 10), each conditioned on y:

    eps_hat = eps_theta(x_t, t) - w * sqrt(1 - abar_t) * (y_t - x_t),
    y_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps_theta,

so the reconstruction stays close to the input where it is normal and becomes normal where it is
not. The anomaly map is ``v * max(Df) / max(Dp) * Dp + Df`` (see :mod:`.diffusion_detector`).
Domain adaptation fine-tunes a copy of the feature extractor on pairs (reconstruction of a good
image, that image): a similarity loss (1 - cos between their features) plus ``da_lambda`` times a
distillation loss keeping each close to the frozen extractor's features.

UNets: ``unet="ddad"`` is the paper's configuration (base 64 channels), ``"ddad_s"`` the small
DDAD-S (base 32); the default ``"small"`` (base 16, one residual block per level) is what a CPU
trains in minutes at 64 px. The CPU defaults also train only on steps below
``max_train_timestep=500`` (inference never starts above step 400) and stop after a 600 s
``time_budget``. For a GPU use ``image_size=256, unet="ddad", epochs=2000, time_budget=None,
max_train_timestep=None, blur_sigma=4`` as in the paper.

The unconditioned baseline (plain DDIM reconstruction, pixel distance) is
``w=0, distance="pixel", da_epochs=0``.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..errors import DefectscopeError
from ..nn import diffusion as dm
from ..nn.state import under_prefix, with_prefix
from ..thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from ..training import CachedImages, shuffled_batches
from .diffusion_detector import DiffusionDetector, Distance
from .params import base_params


class DDAD(DiffusionDetector):
    """Target-conditioned DDIM reconstruction with pixel + (domain-adapted) feature distances."""

    name = "ddad"
    export_unsupported = None

    def __init__(
        self,
        image_size: int = 64,
        unet: str = "small",
        t_start: int = 250,
        steps: int = 10,
        w: float = 4.0,
        eta: float = 0.0,
        distance: Distance = "both",
        v: float = 1.0,
        blur_sigma: float = 1.0,
        da_epochs: int = 3,
        da_images: int | None = 128,
        w_da: float = 3.0,
        da_lambda: float = 0.1,
        da_lr: float = 1e-4,
        backbone: str = "efficientnet_lite0",
        layers: tuple[str, ...] = ("s4", "s8"),
        weights: str | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        max_train_timestep: int | None = 500,
        ema_decay: float = 0.999,
        epochs: int = 100,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        time_budget: float | None = 600.0,
        batch_size: int = 16,
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
        if da_epochs < 0:
            raise DefectscopeError(f"da_epochs must be 0 (no domain adaptation) or more, got {da_epochs}")
        if da_images is not None and da_images < 2:
            raise DefectscopeError(f"da_images must be at least 2 (or None for all), got {da_images}")
        if da_lr <= 0 or da_lambda < 0:
            raise DefectscopeError(f"da_lr must be positive and da_lambda non-negative, got {da_lr} and {da_lambda}")
        self.t_start = t_start
        self.w = w
        self.da_epochs = da_epochs
        self.da_images = da_images
        self.w_da = w_da
        self.da_lambda = da_lambda
        self.da_lr = da_lr
        self._adapted: nn.Module | None = None  # domain-adapted copy of the extractor
        self._da_info: dict[str, Any] = {}

    @property
    def feature_extractor(self) -> nn.Module:
        return self._adapted if self._adapted is not None else self.extractor

    def _conditioned(self, y: torch.Tensor, w: float) -> torch.Tensor:
        return dm.ddim_denoise(
            self.noise_model(), y, self.t_start, self.steps, self.abar, w=w, eta=self.eta, seed=self.seed
        )

    def _denoise(self, y: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self._conditioned(y, self.w)

    # -- domain adaptation --------------------------------------------------------------------
    def _after_training(self, images: CachedImages) -> None:
        self._adapted, self._da_info = None, {}
        if self.da_epochs == 0 or self.distance == "pixel":
            return
        pairs = self._reconstruction_pairs(images)
        teacher = self.extractor
        student = copy.deepcopy(teacher).requires_grad_(True)
        optimizer = torch.optim.Adam(student.parameters(), lr=self.da_lr)

        def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            target, recon = batch["image"].to(self.device), batch["reconstruction"].to(self.device)
            similarity, distillation = domain_adaptation_losses(student, teacher, target, recon)
            return {
                "loss": similarity + self.da_lambda * distillation,
                "similarity": similarity,
                "distillation": distillation,
            }

        trainer = self.trainer(
            {"extractor": student},
            optimizer,
            epochs=self.da_epochs,
            stage="domain adaptation",
            desc="domain adaptation",
        )
        log = trainer.run(lambda epoch: shuffled_batches(pairs, self.batch_size, seed=self.seed, epoch=epoch), step)
        self._adapted = student.eval().requires_grad_(False)
        self._da_info = {
            "images": len(pairs),
            "epochs": log.epochs_done,
            "seconds": round(log.seconds, 3),
            "final_loss": log.epoch_losses[-1] if log.epoch_losses else None,
        }

    def _reconstruction_pairs(self, images: CachedImages) -> list[dict[str, Any]]:
        """Good training images (a seeded subset of ``da_images``) with their ``w_da``-conditioned reconstructions."""
        order = np.random.default_rng([self.seed, 13]).permutation(len(images))
        chosen = sorted(order[: self.da_images].tolist()) if self.da_images is not None else range(len(images))
        items = [images[int(i)] for i in chosen]
        pairs = []
        with torch.no_grad():
            for start in range(0, len(items), self.batch_size):
                part = items[start : start + self.batch_size]
                batch = torch.stack([item["image"] for item in part]).to(self.device)
                recon = self.to_image_space(self._conditioned(self.to_model_space(batch), self.w_da)).cpu()
                pairs += [
                    {"image": item["image"], "reconstruction": r, "path": item["path"]} for item, r in zip(part, recon)
                ]
        return pairs

    def _fit_details(self) -> dict[str, Any]:
        return super()._fit_details() | ({"domain_adaptation": self._da_info} if self._da_info else {})

    # -- save / load --------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module | None]:
        return super()._modules() | {"adapted": self._adapted}

    def _state(self) -> dict[str, torch.Tensor]:
        state = super()._state()
        if self._adapted is not None:
            state |= with_prefix("adapted", self._adapted)
        return state

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._load_state(tensors)
        adapted = under_prefix(tensors, "adapted")
        self._adapted = None
        if adapted:
            student = copy.deepcopy(self.extractor)
            student.load_state_dict(adapted)
            self._adapted = student.eval()


def domain_adaptation_losses(
    student: nn.Module, teacher: nn.Module, target: torch.Tensor, recon: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDAD's similarity and distillation losses, each summed over layers of mean ``1 - cos``.

    Similarity: the adapted features of a good image and of its reconstruction should agree.
    Distillation: the adapted features of both should stay close to the frozen teacher's.
    """

    def dissimilarity(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        # One term per layer and at least one layer, so the sum is a tensor.
        return cast(
            torch.Tensor, sum((1 - torch.nn.functional.cosine_similarity(x, y, dim=1)).mean() for x, y in zip(a, b))
        )

    s_target, s_recon = student(target), student(recon)
    with torch.no_grad():
        t_target, t_recon = teacher(target), teacher(recon)
    return dissimilarity(s_target, s_recon), dissimilarity(s_target, t_target) + dissimilarity(s_recon, t_recon)
