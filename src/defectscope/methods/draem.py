"""DRAEM (Zavrtanik et al., "DRAEM - A discriminatively trained reconstruction embedding for
surface anomaly detection", ICCV 2021).

Two networks are trained together on good images with synthetic anomalies painted in (a
Perlin-noise shape filled with a blended, augmented texture; half of the images are left clean,
as in the paper). The *reconstructive* network, an autoencoder without skip connections, learns
to restore the good image from the corrupted one (L2 + SSIM loss, SSIM window 11; a sigmoid
keeps its output in [0, 1], where the paper's output is linear). The *discriminative* network, a
U-Net, sees the corrupted image next to its reconstruction and segments the painted region
(focal loss, gamma 2). At test time the softmax anomaly channel of the segmentation is the
anomaly map (smoothed by the shared post-processing); the image score is the maximum of the map
after a mean filter (21 x 21 at 256 px in the paper, scaled to ``image_size``).

Texture source: the paper paints DTD textures. Without ``texture_dir`` (a folder of texture
images, e.g. DTD) the textures are the training images themselves, heavily augmented, since no
texture set ships with defectscope; ``fit_info["texture_source"]`` says which was used.

CPU defaults: the paper trains 700 epochs of batch 8 at 256 px with widths 128
(reconstructive) and 64 (discriminative). The defaults here (96 px, widths 8 and 8, batch 4,
22 epochs, learning rate 1e-3) train in about 6 CPU-minutes on one core; on MVTec bottle they
reach an image AUROC of about 0.91. For the paper's settings on a GPU use ``image_size=256,
base_channels=128, disc_channels=64, batch_size=8, epochs=700, lr=1e-4``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..data import ImageDataset
from ..data.dataset import Batch
from ..data.synth import PerlinTexture, SynthDataset
from ..errors import DefectscopeError
from ..nn.blocks import EncoderDecoder
from ..nn.losses import focal_loss, ssim_loss
from ..nn.state import under_prefix, with_prefix
from ..postprocess import gaussian_blur
from ..thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from ..training import CachedImages, shuffled_batches
from .base import Prediction, fitted
from .params import base_params, check_at_least
from .trained import TrainedDetector

RECONSTRUCTIVE_LEVELS = (1, 2, 4, 8, 8)  # width multipliers of the reconstructive encoder (paper)
DISCRIMINATIVE_LEVELS = (1, 2, 4, 8, 8, 8)  # and of the discriminative U-Net encoder (paper)


def step_schedule(epochs: int) -> Callable[[int], float]:
    """The paper's learning-rate factor: 1, then x0.2 after 80 % and again after 90 % of the epochs."""

    def factor(epoch: int) -> float:
        return 1.0 if epoch < 0.8 * epochs else 0.2 if epoch < 0.9 * epochs else 0.04

    return factor


class DRAEM(TrainedDetector):
    """Reconstruct-then-segment detector trained on synthetic anomalies."""

    name = "draem"
    export_unsupported = None
    nonnegative_scores = True

    def __init__(
        self,
        image_size: int = 96,
        base_channels: int = 8,
        disc_channels: int = 8,
        epochs: int = 22,
        lr: float = 1e-3,
        time_budget: float | None = None,
        texture_dir: str | None = None,
        anomaly_probability: float = 0.5,
        ssim_window: int = 11,
        focal_gamma: float = 2.0,
        blur_sigma: float = 2.0,
        score_window: int = 21,
        batch_size: int = 4,
        calibration_fraction: float = 0.1,
        threshold_rule: ThresholdRule = DEFAULT_RULE,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        false_alarm_confidence: float | None = None,
        target_recall: float = DEFAULT_TARGET_RECALL,
        threshold_sigmas: float = 3.0,
        seed: int = 0,
    ) -> None:
        super().__init__(**base_params(DRAEM, locals()))
        check_at_least(0, focal_gamma=focal_gamma)
        if base_channels < 1 or disc_channels < 1:
            raise DefectscopeError(
                f"base_channels and disc_channels must be at least 1, got {base_channels} and {disc_channels}"
            )
        if not 0.0 <= anomaly_probability <= 1.0:
            raise DefectscopeError(f"anomaly_probability must be in [0, 1], got {anomaly_probability}")
        if ssim_window < 3 or ssim_window % 2 == 0 or ssim_window > image_size:
            raise DefectscopeError(f"ssim_window must be odd, at least 3 and at most image_size, got {ssim_window}")
        if score_window < 1:
            raise DefectscopeError(f"score_window must be at least 1, got {score_window}")
        if image_size % 32:
            raise DefectscopeError(f"DRAEM needs image_size divisible by 32 (five poolings), got {image_size}")
        self.base_channels = base_channels
        self.disc_channels = disc_channels
        self.texture_dir = None if texture_dir is None else str(texture_dir)
        self.anomaly_probability = anomaly_probability
        self.ssim_window = ssim_window
        self.focal_gamma = focal_gamma
        self.blur_sigma = blur_sigma
        self.score_window = score_window
        self._reconstructive: EncoderDecoder | None = None
        self._discriminative: EncoderDecoder | None = None
        self._texture_source: str | None = None

    # -- networks ----------------------------------------------------------------------------
    def _build(self) -> None:
        self._reconstructive = EncoderDecoder(
            3, 3, [self.base_channels * m for m in RECONSTRUCTIVE_LEVELS], skips=False
        ).to(self.device)
        self._discriminative = EncoderDecoder(
            6, 2, [self.disc_channels * m for m in DISCRIMINATIVE_LEVELS], skips=True
        ).to(self.device)

    @property
    def reconstructive(self) -> EncoderDecoder:
        """The network restoring good images from corrupted ones (its logits; a sigmoid maps them to [0, 1])."""
        return fitted(self, self._reconstructive)

    @property
    def discriminative(self) -> EncoderDecoder:
        """The U-Net segmenting anomalies from (image, reconstruction) pairs (2 logit channels)."""
        return fitted(self, self._discriminative)

    def _modules(self) -> dict[str, torch.nn.Module | None]:
        return super()._modules() | {"reconstructive": self._reconstructive, "discriminative": self._discriminative}

    # -- training ----------------------------------------------------------------------------
    def _fit(self, dataset: ImageDataset) -> None:
        if len(dataset) < 2:
            raise DefectscopeError(f"DRAEM needs at least 2 fitting images, got {len(dataset)}")
        synthesizer = PerlinTexture(texture_dir=self.texture_dir, probability=self.anomaly_probability)
        self._texture_source = synthesizer.texture_source
        train_set = SynthDataset(CachedImages(dataset), synthesizer, seed=self.seed)
        self._build()
        rec, disc = self.reconstructive, self.discriminative
        optimizer = torch.optim.Adam([*rec.parameters(), *disc.parameters()], lr=self.lr)
        batch_size = min(self.batch_size, len(dataset))

        def step(batch: Batch) -> dict[str, torch.Tensor]:
            good = batch["image"].to(self.device)
            corrupted = batch["synth_image"].to(self.device)
            mask = batch["synth_mask"].to(self.device)
            restored = rec(corrupted).sigmoid()
            logits = disc(torch.cat([restored, corrupted], 1))
            l2 = F.mse_loss(restored, good)
            ssim = ssim_loss(restored, good, self.ssim_window)
            focal = focal_loss(logits, mask.round().long(), self.focal_gamma)
            return {"loss": l2 + ssim + focal, "l2": l2, "ssim": ssim, "focal": focal}

        self.train(
            {"reconstructive": rec, "discriminative": disc},
            optimizer,
            lambda epoch: shuffled_batches(train_set, batch_size, seed=self.seed, epoch=epoch, threads=2),
            step,
            lr_schedule=step_schedule(self.epochs),
            desc="training DRAEM",
        )

    def _fit_details(self) -> dict[str, Any]:
        source = self._texture_source
        note = (
            ("textures from " + str(self.texture_dir))
            if source == "folder"
            else "no texture_dir given: anomalies painted with augmented training images (the paper uses DTD textures)"
        )
        return super()._fit_details() | {"texture_source": source, "texture_note": note}

    # -- inference -----------------------------------------------------------------------------
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstructive network's restoration (B, 3, H, W) in [0, 1] of images (B, 3, H, W) in [0, 1]."""
        rec = self.reconstructive
        rec.eval()
        with torch.no_grad():
            return rec(images.float().to(self.device)).sigmoid().cpu()

    def _predict(self, images: torch.Tensor) -> Prediction:
        rec, disc = self.reconstructive, self.discriminative
        rec.eval()
        disc.eval()
        restored = rec(images).sigmoid()
        anomaly = disc(torch.cat([restored, images], 1)).softmax(1)[:, 1]
        maps = gaussian_blur(anomaly, self.blur_sigma).clamp(0, 1)
        k = max(1, round(self.score_window * self.image_size / 256)) // 2 * 2 + 1  # odd, scaled from 256 px
        pooled = F.avg_pool2d(maps[:, None], k, stride=1, padding=k // 2, count_include_pad=False)
        return Prediction(pooled.flatten(1).amax(1), maps, reconstructions=restored)

    # -- state ---------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        return with_prefix("reconstructive", self.reconstructive) | with_prefix("discriminative", self.discriminative)

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        for name, net in (("reconstructive", self.reconstructive), ("discriminative", self.discriminative)):
            net.load_state_dict(under_prefix(tensors, name))
            net.eval()
