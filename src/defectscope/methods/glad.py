"""GLAD (Yao et al., "GLAD: Towards Better Reconstruction with Global and Local Adaptive Diffusion
Models for Unsupervised Anomaly Detection", ECCV 2024).

Three ideas on top of a DDIM reconstruction:

- global adaptivity: each image gets its own denoising start step in ``step_range``. A probe
  noises the input to ``probe_step``, predicts the clean image in one step and measures how far
  that prediction is from the input (``probe_distance``: the backbone feature distance Df by
  default, or the pixel distance; the score is the mean of the highest 1 % of the map). Images
  far from the model's prior, judged against the same score on good training images (mean ->
  the low end of the range, mean + ``step_sigmas`` standard deviations -> the high end), are
  noised more.
- local adaptivity: training also sees synthetic anomalies (Perlin-shaped textures, probability
  ``anomaly_probability``). Inside them the UNet learns to predict the noise that leads back to
  the normal image instead of the noise that was added, so denoising removes anomalies even from
  a moderate step. That target grows like sqrt(abar / (1 - abar)) at small steps; its loss is
  weighted by min(1, (1 - abar) / abar) there (an x0 loss), which keeps training stable.
- spatial-adaptive fusion: every denoising state is fused with the input noised to the same
  level, ``m * x + (1 - m) * y_t``, where the soft mask m (from the probe's discrepancy map)
  rises from 0 to 1 between two quantiles (``fusion_quantiles``) of that map on good images;
  normal regions keep the input's detail and abnormal ones take the reconstruction.

The paper fine-tunes a pretrained latent diffusion model. No such weights are assumed here. By
default (``space="features"``, as DDAD) GLAD denoises the frozen backbone's standardised feature
maps (:mod:`.feature_space`), a latent space that needs no training, with a UNet that predicts
the clean sample: inside a synthetic anomaly (pasted into the image before the features are
taken) its target is the normal image's features. The probe and the map are ``1 - cos`` between
features. ``space="pixel"`` trains the from-scratch pixel-space DDPM of DDAD's paper setting (the
probe then uses ``probe_distance``; on mtd at 64 px a pixel-space probe hardly separated
defective from good images, image AUROC about 0.5, against about 0.62 for the feature one, hence
its default). ``pretrained_unet`` (a diffusers ``UNet2DModel`` folder) starts from pretrained
weights, and ``pretrained_vae`` (an ``AutoencoderKL`` or ``VQModel`` folder, pixel space only)
moves the diffusion into that autoencoder's latent space; the autoencoder stays frozen and is
read from its folder again when the model is loaded. Outside feature space the anomaly map is
DDAD's pixel + feature map of the input and its reconstruction, with the feature extractor
domain-adapted on good images and their GLAD reconstructions as GLAD's code does for its DINO
extractor (:mod:`.domain_adaptation`; ``da_epochs=0`` keeps it frozen); the probe keeps the
frozen extractor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import Batch, ItemSource
from ..data.synth import PerlinTexture, SynthDataset
from ..errors import DefectscopeError
from ..nn import diffusion as dm
from ..postprocess import gaussian_blur
from ..thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from ..training import CachedImages
from .base import fitted
from .diffusion_detector import DiffusionDetector, Distance, PredictionKind, Space
from .feature_space import feature_space_map
from .params import base_params

AUTOENCODERS = ("AutoencoderKL", "VQModel")


class GLAD(DiffusionDetector):
    """Diffusion reconstruction with per-image denoising steps, anomaly-aware training and spatial fusion."""

    name = "glad"
    #: Models saved before GLAD had its ``da_*`` parameters were pixel-space and not domain-adapted.
    added_params: ClassVar[dict[str, Any]] = DiffusionDetector.added_params | {
        "da_epochs": 0,
        "da_images": 128,
        "da_lambda": 0.1,
        "da_lr": 1e-4,
    }
    export_unsupported = None

    def __init__(
        self,
        image_size: int = 64,
        space: Space = "features",
        prediction: PredictionKind = "sample",
        unet: str = "features",
        step_range: tuple[int, int] = (100, 400),
        steps: int = 10,
        probe_step: int = 200,
        probe_distance: Literal["feature", "pixel"] = "feature",
        step_sigmas: float = 3.0,
        fusion_quantiles: tuple[float, float] = (0.5, 0.99),
        anomaly_probability: float = 0.5,
        texture_dir: str | None = None,
        eta: float = 0.0,
        distance: Distance = "both",
        v: float = 1.0,
        blur_sigma: float = 4.0,
        da_epochs: int = 3,
        da_images: int | None = 128,
        da_lambda: float = 0.1,
        da_lr: float = 1e-4,
        pretrained_unet: str | None = None,
        pretrained_vae: str | None = None,
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
        super().__init__(**base_params(GLAD, locals()))
        step_range = cast("tuple[int, int]", tuple(int(t) for t in step_range))  # the length is checked next
        if len(step_range) != 2 or not 0 <= step_range[0] <= step_range[1] <= num_train_timesteps:
            raise DefectscopeError(
                f"step_range must be (low, high) with 0 <= low <= high <= {num_train_timesteps}, got {step_range}"
            )
        if not 1 <= probe_step <= num_train_timesteps:
            raise DefectscopeError(f"probe_step must be in [1, {num_train_timesteps}], got {probe_step}")
        if probe_distance not in ("feature", "pixel"):
            raise DefectscopeError(f"probe_distance must be feature or pixel, got {probe_distance!r}")
        fusion_quantiles = cast("tuple[float, float]", tuple(float(q) for q in fusion_quantiles))  # checked next
        if len(fusion_quantiles) != 2 or not 0.0 <= fusion_quantiles[0] < fusion_quantiles[1] <= 1.0:
            raise DefectscopeError(
                f"fusion_quantiles must be (low, high) with 0 <= low < high <= 1, got {fusion_quantiles}"
            )
        if not 0.0 <= anomaly_probability <= 1.0:
            raise DefectscopeError(f"anomaly_probability must be in [0, 1], got {anomaly_probability}")
        self.step_range = step_range
        self.probe_step = probe_step
        self.probe_distance = probe_distance
        self.step_sigmas = step_sigmas
        self.fusion_quantiles = fusion_quantiles
        self.anomaly_probability = anomaly_probability
        self.texture_dir = texture_dir
        if pretrained_vae is not None and space == "features":
            raise DefectscopeError("pretrained_vae moves the diffusion into a latent space; use it with space='pixel'")
        self.pretrained_unet = pretrained_unet
        self.pretrained_vae = pretrained_vae
        self._vae: nn.Module | None = None
        self._stats: torch.Tensor | None = None  # (4,) probe score low/high, fusion discrepancy low/high

    # -- model space: pixels, or a pretrained autoencoder's latents ---------------------------------
    @property
    def vae(self) -> nn.Module | None:
        """The frozen autoencoder of ``pretrained_vae`` (None for pixel-space diffusion)."""
        if self.pretrained_vae is not None and self._vae is None:
            vae = dm.load_pretrained(self.pretrained_vae, AUTOENCODERS)
            self._vae = vae.to(self.device).eval().requires_grad_(False)
        return self._vae

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        vae: Any = self.vae  # a diffusers autoencoder; diffusers has no type information
        if vae is None:
            return super().to_model_space(images)
        x = images * 2 - 1
        with torch.no_grad():
            encoded = vae.encode(x)
            z = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        return z * vae.config.scaling_factor

    def to_image_space(self, x: torch.Tensor) -> torch.Tensor:
        vae: Any = self.vae  # a diffusers autoencoder; diffusers has no type information
        if vae is None:
            return super().to_image_space(x)
        with torch.no_grad():
            x = vae.decode(x / vae.config.scaling_factor).sample
        return ((x + 1) / 2).clamp(0, 1)

    def _model_shape(self) -> tuple[int, int]:
        vae: Any = self.vae  # diffusers models have no type information
        if vae is None:
            return super()._model_shape()
        return vae.config.latent_channels, self.image_size // 2 ** (len(vae.config.block_out_channels) - 1)

    def _new_network(self) -> nn.Module:
        vae: Any = self.vae  # diffusers models have no type information
        channels, size = self._model_shape()
        if self.pretrained_unet is None:
            return dm.build_unet(self.unet, size, channels)
        network = dm.load_pretrained(self.pretrained_unet, ("UNet2DModel",))
        config: Any = network.config
        sample = config.sample_size if isinstance(config.sample_size, int) else next(iter(config.sample_size))
        if config.in_channels != channels or config.out_channels != channels:
            raise DefectscopeError(
                f"{self.pretrained_unet}: the UNet takes {config.in_channels} channels, the "
                f"{'latents' if vae is not None else self.space} have {channels}"
            )
        if sample != size:
            raise DefectscopeError(
                f"{self.pretrained_unet}: the UNet was made for {sample} px inputs; "
                f"use image_size={sample if vae is None else self.image_size * sample // size}"
            )
        return network

    # -- training with synthetic anomalies -----------------------------------------------------------
    def _training_items(self, images: CachedImages) -> ItemSource:
        texture = PerlinTexture(texture_dir=self.texture_dir, probability=self.anomaly_probability)
        return SynthDataset(images, texture, seed=self.seed)

    def _loss(self, batch: Batch, model: nn.Module) -> dict[str, torch.Tensor]:
        x_normal = self.to_model_space(batch["image"].to(self.device))
        x_input = self.to_model_space(batch["synth_image"].to(self.device))
        mask = batch["synth_mask"].to(self.device)[:, None].float()
        if mask.shape[-2:] != x_input.shape[-2:]:
            mask = F.interpolate(mask, size=x_input.shape[-2:], mode="area")
        t, eps, abar_t = self._sample_noise(x_input)
        pred = model(dm.add_noise(x_input, eps, abar_t), t).sample
        if self.prediction == "sample":  # the clean target is the normal image, inside anomalies too
            error = dm.prediction_loss(pred, x_normal, eps, abar_t, "sample")
            weight = torch.ones_like(mask)
        else:
            error = (pred - dm.anomaly_noise_target(eps, x_input, x_normal, abar_t)).pow(2)
            weight = 1 + mask * (((1 - abar_t) / abar_t).clamp(max=1) - 1)
        normal_part = (error * (1 - mask)).sum() / (1 - mask).sum().clamp(min=1) / error.shape[1]
        return {"loss": (weight * error).mean(), "normal": normal_part}

    # -- global and local adaptivity at inference -------------------------------------------------
    @property
    def stats(self) -> torch.Tensor:
        """(4,) probe score at the low and high end of the step range, fusion discrepancy low and high."""
        return fitted(self, self._stats)

    def _probe(self, y: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Discrepancy map (B, h, w) and score (B,) between inputs and their one-step clean prediction.

        ``y`` is the model-space version of ``images`` (B, 3, H, W) in [0, 1].
        """
        t = torch.full((y.shape[0],), self.probe_step - 1, device=y.device)
        abar_t = dm.gather_abar(self.abar, t)
        noise = dm.fixed_noise((1, *y.shape[1:]), 1, self.seed, y.device)[0]
        x_t = dm.add_noise(y, noise, abar_t)
        x0_hat = dm.predicted_x0(x_t, self.noise_model()(x_t, t), abar_t)
        if self.space == "features":
            d = feature_space_map(y, x0_hat, images.shape[-2:], 0.0)
        elif self.probe_distance == "pixel":
            d = dm.pixel_distance(y, x0_hat)
        else:
            extractor = self.extractor
            d = dm.feature_distance(extractor(images), extractor(self.to_image_space(x0_hat)), images.shape[-2:])
        d = gaussian_blur(d, self.blur_sigma)
        return d, dm.discrepancy_score(d)

    def _steps_and_mask(self, y: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, score = self._probe(y, images)
        stats = self.stats.to(y.device)
        return (dm.adaptive_steps(score, stats[0], stats[1], *self.step_range), dm.fusion_mask(d, stats[2], stats[3]))

    @torch.no_grad()
    def adaptive_steps(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) the denoising start step chosen for each image (B, 3, H, W) in [0, 1]."""
        images = images.float().to(self.device)
        return self._steps_and_mask(self.to_model_space(images), images)[0].cpu()

    def _denoise(self, y: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        t_start, mask = self._steps_and_mask(y, images)

        def fuse(x_next: torch.Tensor, y_next: torch.Tensor, _x0: torch.Tensor) -> torch.Tensor:
            return dm.spatial_fusion(y_next, x_next, mask)

        return dm.ddim_denoise(
            self.noise_model(), y, t_start, self.steps, self.abar, eta=self.eta, seed=self.seed, fuse=fuse
        )

    def _calibrate_denoising(self, images: torch.Tensor) -> None:
        maps, scores = [], []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size].to(self.device)
                d, s = self._probe(self.to_model_space(batch), batch)
                maps.append(d.flatten().cpu())
                scores.append(s.cpu())
        score, pixels = torch.cat(scores).double(), torch.cat(maps).double()
        spread = score.std() if len(score) > 1 else score.new_tensor(0.0)
        pixels = pixels[:: -(-len(pixels) // 1_000_000)]  # torch.quantile takes at most 16M values
        low, high = torch.quantile(pixels, torch.tensor(self.fusion_quantiles, dtype=torch.float64))
        self._stats = torch.stack([score.mean(), score.mean() + self.step_sigmas * spread, low, high]).float()

    # -- save / load --------------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module | None]:
        return super()._modules() | {"vae": self._vae}

    def _state(self) -> dict[str, torch.Tensor]:
        return super()._state() | {"stats": self.stats}

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._load_state(tensors)
        stats = tensors["stats"].float()
        if stats.shape != (4,):
            raise ValueError(f"stats must have shape (4,), got {tuple(stats.shape)}")
        self._stats = stats

    def _check_config(self, config: dict[str, Any], folder: Path) -> None:
        super()._check_config(config, folder)
        if self.pretrained_vae is not None and not Path(self.pretrained_vae).expanduser().is_dir():
            raise DefectscopeError(f"{folder}: fitted in the latent space of {self.pretrained_vae}, which is missing")
