"""Detectors that reconstruct an image with a denoising diffusion model and score the difference.

:class:`DiffusionDetector` holds what DDAD and GLAD share: a diffusers ``UNet2DModel`` trained
from scratch on good images through the shared training loop, on pixels or on the frozen
backbone's feature maps (``space``, :mod:`.feature_space`), predicting the noise (Ho et al. 2020)
or the clean sample (``prediction``), an exponential moving average of its weights for sampling,
a backbone for the feature distance (in pixel space domain-adapted on good images and their
reconstructions after the UNet is trained, :mod:`.domain_adaptation`), and the anomaly map of
DDAD,

    map = blur(v * ratio * Dp + Df),   Dp = mean_c |x - x_rec|,   Df = sum_l (1 - cos(phi_l(x), phi_l(x_rec))),

where the paper's ``ratio = max(Df) / max(Dp)`` is measured once on good training images after
fitting (instead of per test batch) so that an image's score does not depend on the other
images of its batch. ``distance="pixel"`` or ``"feature"`` keeps one term only. In feature space
the map is the one distance there is, ``1 - cos`` between input and reconstructed features
(``distance``, ``v`` and domain adaptation apply to pixel space). A subclass implements
:meth:`DiffusionDetector._denoise` (how an input is noised and denoised) and may change the
training loss and the items it trains on.

diffusers is imported lazily: the rest of defectscope works without it, and these methods say
``pip install defectscope[diffusion]`` when it is missing.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
from torch import nn

from ..data import ImageDataset
from ..data.dataset import Batch, ItemSource
from ..errors import DefectscopeError
from ..nn import diffusion as dm
from ..nn.state import under_prefix, with_prefix
from ..training import CachedImages, shuffled_batches
from .backbone_detector import BackboneDetector
from .base import Prediction, fitted
from .domain_adaptation import adapt_extractor, reconstruction_pairs
from .feature_space import feature_space_map, feature_stats, grid_features, standardise
from .params import check_at_least, check_choice
from .trained import TrainedDetector

Distance = Literal["both", "pixel", "feature"]
DISTANCES: tuple[str, ...] = get_args(Distance)
Space = Literal["features", "pixel"]
SPACES: tuple[str, ...] = get_args(Space)
PredictionKind = Literal["sample", "epsilon"]
PREDICTIONS: tuple[str, ...] = get_args(PredictionKind)
CALIBRATION_IMAGES = 64  # good training images used to measure the map ratio (and GLAD's statistics)


class DiffusionDetector(TrainedDetector, BackboneDetector):
    """Base of the diffusion reconstruction methods; see the module docstring."""

    extra_config_keys: ClassVar[dict[str, type]] = {**BackboneDetector.extra_config_keys, "unet_config": dict}
    #: Models saved before ``space`` and ``prediction`` existed were pixel-space noise predictors.
    added_params: ClassVar[dict[str, Any]] = {"space": "pixel", "prediction": "epsilon"}
    param_help: ClassVar[dict[str, str]] = {
        "space": "what the UNet denoises: features (backbone feature maps; the CPU default) or pixel (the papers')",
        "prediction": "what the UNet predicts: sample (the clean input) or epsilon (the noise, the papers')",
        "unet": "UNet preset: features, small, ddad_s, ddad (the paper's), tiny",
        "da_epochs": "epochs of domain adaptation of the feature extractor (pixel space; 0: none)",
    }

    def __init__(
        self,
        *,
        space: Space,
        prediction: PredictionKind,
        unet: str,
        steps: int,
        eta: float,
        distance: Distance,
        v: float,
        blur_sigma: float,
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        ema_decay: float,
        max_train_timestep: int | None,
        weight_decay: float,
        da_epochs: int,
        da_images: int | None,
        da_lambda: float,
        da_lr: float,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        check_choice("space", space, SPACES)
        check_choice("prediction", prediction, PREDICTIONS)
        if da_epochs < 0:
            raise DefectscopeError(f"da_epochs must be 0 (no domain adaptation) or more, got {da_epochs}")
        if da_images is not None and da_images < 2:
            raise DefectscopeError(f"da_images must be at least 2 (or None for all), got {da_images}")
        if da_lr <= 0 or da_lambda < 0:
            raise DefectscopeError(f"da_lr must be positive and da_lambda non-negative, got {da_lr} and {da_lambda}")
        check_choice("distance", distance, DISTANCES)
        check_at_least(1, steps=steps, num_train_timesteps=num_train_timesteps)
        check_at_least(0, v=v, weight_decay=weight_decay)
        if not 0.0 < beta_start < beta_end < 1.0:
            raise DefectscopeError(
                f"beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1, got {beta_start} and {beta_end}"
            )
        if not 0.0 <= eta <= 1.0:
            raise DefectscopeError(f"eta must be in [0, 1], got {eta}")
        if max_train_timestep is not None and not 1 <= max_train_timestep <= num_train_timesteps:
            raise DefectscopeError(
                f"max_train_timestep must be in [1, {num_train_timesteps}] or None, got {max_train_timestep}"
            )
        if not 0.0 <= ema_decay < 1.0:
            raise DefectscopeError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if unet not in dm.UNET_PRESETS:
            raise DefectscopeError(f"unknown unet {unet!r} (choose from {', '.join(dm.UNET_PRESETS)})")
        self.space = space
        self.prediction = prediction
        self.unet = unet
        self.steps = steps
        self.eta = eta
        self.distance = distance
        self.v = v
        self.blur_sigma = blur_sigma
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.ema_decay = ema_decay
        self.max_train_timestep = max_train_timestep
        self.weight_decay = weight_decay
        self.da_epochs = da_epochs
        self.da_images = da_images
        self.da_lambda = da_lambda
        self.da_lr = da_lr
        self._adapted: nn.Module | None = None  # domain-adapted copy of the extractor
        self._da_info: dict[str, Any] = {}
        self._network: nn.Module | None = None  # the UNet used for sampling (the EMA copy when averaging)
        self._network_config: dict[str, Any] | None = None
        self._ratio: torch.Tensor | None = None  # () max(Df) / max(Dp) on good images
        self._abar: torch.Tensor | None = None  # on self.device
        self._feature_stats: torch.Tensor | None = None  # (2, C) feature mean and std (space="features")
        self._train_steps = 0

    # -- pieces ------------------------------------------------------------------------------
    @property
    def abar(self) -> torch.Tensor:
        """(T,) cumulative noise schedule ``alphas_cumprod`` (diffusers' DDPM linear schedule by default)."""
        if self._abar is None:
            self._abar = dm.alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end)
        if self._abar.device != self.device:
            self._abar = self._abar.to(self.device)
        return self._abar

    @property
    def network(self) -> nn.Module:
        """The denoising UNet used at inference."""
        return fitted(self, self._network)

    @property
    def ratio(self) -> torch.Tensor:
        """max(Df) / max(Dp) measured on good training images (scales Dp in the anomaly map)."""
        return fitted(self, self._ratio)

    def noise_model(self) -> dm.NoiseModel:
        """The UNet as ``eps = model(x_t, t)`` (converted from its clean-sample output for ``prediction="sample"``)."""
        if self.prediction == "sample":
            return dm.sample_noise_model(self.network, self.abar)
        return dm.unet_noise_model(self.network)

    def _model_shape(self) -> tuple[int, int]:
        """(channels, size) of what the UNet denoises."""
        if self.space == "features":
            extractor = self.extractor
            return sum(extractor.channels), self.image_size // extractor.strides[0]
        return 3, self.image_size

    def _new_network(self) -> nn.Module:
        """A UNet to train (a subclass may start from pretrained weights)."""
        channels, size = self._model_shape()
        levels = len(dm.UNET_PRESETS[self.unet]["channel_mults"])
        if self.space == "features" and size % 2 ** (levels - 1):
            step = self.image_size // size * 2 ** (levels - 1)
            raise DefectscopeError(
                f"image_size {self.image_size}: with space='features' the {self.unet} UNet needs a feature grid "
                f"divisible by {2 ** (levels - 1)} (got {size}); use a multiple of {step}, e.g. {max(step, 64)}"
            )
        return dm.build_unet(self.unet, size, channels)

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> what the UNet denoises: pixels in [-1, 1], or standardised backbone features."""
        if self.space == "features":
            with torch.no_grad():
                features = grid_features(self.extractor, images)
                return standardise(features, fitted(self, self._feature_stats).to(features.device))
        return images * 2 - 1

    def to_image_space(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_model_space`, clipped to [0, 1] (pixel space only)."""
        self._require_images()
        return ((x + 1) / 2).clamp(0, 1)

    def _require_images(self) -> None:
        """A clear error in feature space, where what the UNet reconstructs is not an image."""
        if self.space == "features":
            raise DefectscopeError(
                f"{self.name} with space='features' reconstructs backbone features, not images; "
                "use space='pixel' for image reconstructions"
            )

    @property
    def feature_extractor(self) -> nn.Module:
        """The network whose features give Df: the domain-adapted copy of the extractor once there is one."""
        return self._adapted if self._adapted is not None else self.extractor

    # -- training -----------------------------------------------------------------------------
    def _training_items(self, images: CachedImages) -> ItemSource:
        """What a training batch is drawn from (GLAD adds synthetic anomalies)."""
        return images

    def _loss(self, batch: Batch, model: nn.Module) -> dict[str, torch.Tensor]:
        """Noise-prediction loss of plain DDPM training on good images."""
        x0 = self.to_model_space(batch["image"].to(self.device))
        t, eps, abar_t = self._sample_noise(x0)
        pred = model(dm.add_noise(x0, eps, abar_t), t).sample
        return {"loss": dm.prediction_loss(pred, x0, eps, abar_t, self.prediction).mean()}

    def _sample_noise(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Uniform timesteps (below ``max_train_timestep`` when set), Gaussian noise and their abar."""
        high = self.max_train_timestep or self.num_train_timesteps
        t = torch.randint(0, high, (x0.shape[0],), device=self.device)
        return t, torch.randn_like(x0), dm.gather_abar(self.abar, t)

    def _fit(self, dataset: ImageDataset) -> None:
        if len(dataset) < 2:
            raise DefectscopeError(f"{type(self).__name__} needs at least 2 fitting images, got {len(dataset)}")
        self._network = None
        images = CachedImages(dataset)
        self._feature_stats = None
        if self.space == "features":
            self._feature_stats = feature_stats(self.extractor, self._image_batches(images)).cpu()
        items = self._training_items(images)
        model = self._new_network().to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        modules: dict[str, nn.Module] = {"unet": model}
        ema = None
        if self.ema_decay > 0:
            ema = dm.EMA(model, self.ema_decay)
            modules["ema"] = ema
            optimizer.register_step_post_hook(lambda *_: ema.update(model))
        self.train(
            modules,
            optimizer,
            lambda epoch: shuffled_batches(items, self.batch_size, seed=self.seed, epoch=epoch),
            lambda batch: self._loss(batch, model),
            max_grad_norm=1.0,
            desc=f"training {self.name} ({self.unet} UNet)",
        )
        self._train_steps = _optimizer_steps(optimizer)
        network = ema.model if ema is not None else model
        self._network = network.eval().requires_grad_(False)
        self._network_config = dm.unet_config(network)
        calibration = self._calibration_images(images)
        self._calibrate_denoising(calibration)
        self._adapt_extractor(images)
        self._calibrate(calibration)

    def _image_batches(self, images: CachedImages) -> Iterator[torch.Tensor]:
        """The images in order, in batches (B, 3, H, W) on the device."""
        for start in range(0, len(images), self.batch_size):
            stop = min(start + self.batch_size, len(images))
            yield torch.stack([images[i]["image"] for i in range(start, stop)]).to(self.device)

    def _calibrate_denoising(self, images: torch.Tensor) -> None:
        """What denoising needs measured on good images before it can run (GLAD: its probe statistics)."""

    def _adaptation_reconstruction(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstructions of good images (B, 3, H, W) in [0, 1] the extractor is adapted on."""
        return self._reconstruct(images)

    def _adapt_extractor(self, images: CachedImages) -> None:
        """Domain adaptation of the feature extractor (:mod:`.domain_adaptation`) unless disabled."""
        self._adapted, self._da_info = None, {}
        if self.da_epochs == 0 or self.distance == "pixel" or self.space == "features":
            return
        pairs = reconstruction_pairs(
            images,
            self._adaptation_reconstruction,
            count=self.da_images,
            batch_size=self.batch_size,
            seed=self.seed,
            device=self.device,
        )
        self._adapted, self._da_info = adapt_extractor(
            self, self.extractor, pairs, epochs=self.da_epochs, distillation_weight=self.da_lambda, lr=self.da_lr
        )

    def _calibration_images(self, images: CachedImages) -> torch.Tensor:
        """A seeded subset of up to :data:`CALIBRATION_IMAGES` training images (B, 3, H, W)."""
        order = np.random.default_rng([self.seed, 11]).permutation(len(images))[:CALIBRATION_IMAGES]
        return torch.stack([images[int(i)]["image"] for i in sorted(order)])

    @torch.no_grad()
    def _calibrate(self, images: torch.Tensor) -> None:
        """Measure the ratio max(Df) / max(Dp) on good images (pixel space; one distance in feature space)."""
        if self.space == "features":
            self._ratio = torch.tensor(1.0)
            return
        max_dp, max_df = [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size].to(self.device)
            dp, df = self._distances(batch, self._reconstruct(batch))
            max_dp.append(dp.flatten(1).amax(1))
            max_df.append(df.flatten(1).amax(1))
        mean_dp, mean_df = torch.cat(max_dp).mean(), torch.cat(max_df).mean()
        self._ratio = (mean_df / mean_dp.clamp(min=1e-8)).float().cpu()

    def _fit_details(self) -> dict[str, Any]:
        details = super()._fit_details() | {"train_steps": self._train_steps}
        return details | ({"domain_adaptation": self._da_info} if self._da_info else {})

    # -- inference -------------------------------------------------------------------------------
    @abstractmethod
    def _denoise(self, y: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction of model-space inputs ``y`` (B, C, h, w), in model space (``images``: the same in [0, 1])."""

    def _reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_image_space(self._denoise(self.to_model_space(images), images))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """What the model makes of images (B, 3, H, W) in [0, 1]: their anomaly-free version, (B, 3, H, W) in [0, 1]."""
        fitted(self, self._network)
        self._require_images()
        if images.ndim == 3:
            images = images[None]
        return self._reconstruct(images.float().to(self.device)).float().cpu()

    def _distances(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dp and Df (B, H, W) between images and their reconstructions."""
        dp = dm.pixel_distance(images, recon)
        if self.distance == "pixel":
            return dp, torch.zeros_like(dp)
        extractor = self.feature_extractor
        df = dm.feature_distance(extractor(images), extractor(recon), images.shape[-2:])
        return dp, df

    def anomaly_map(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """(B, H, W) anomaly map of images given their reconstructions (see the module docstring)."""
        dp, df = self._distances(images, recon)
        if self.distance == "pixel":
            return dm.combine_distances(dp, df, 1.0, 1.0, self.blur_sigma)
        if self.distance == "feature":
            return dm.combine_distances(dp, df, 0.0, 0.0, self.blur_sigma)
        return dm.combine_distances(dp, df, self.v, self.ratio.to(dp.device), self.blur_sigma)

    def _predict(self, images: torch.Tensor) -> Prediction:
        if self.space == "features":
            y = self.to_model_space(images)
            maps = feature_space_map(y, self._denoise(y, images), images.shape[-2:], self.blur_sigma)
            return Prediction(maps.flatten(1).amax(1), maps)
        recon = self._reconstruct(images)
        maps = self.anomaly_map(images, recon)
        return Prediction(maps.flatten(1).amax(1), maps, reconstructions=recon)

    # -- save / load -----------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module | None]:
        return super()._modules() | {"unet": self._network, "adapted": self._adapted}

    def _state(self) -> dict[str, torch.Tensor]:
        state = with_prefix("unet", self.network) | {"ratio": self.ratio.reshape(1)}
        if self._feature_stats is not None:
            state["feature_stats"] = self._feature_stats
        return state | (with_prefix("adapted", self._adapted) if self._adapted is not None else {})

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._network_config is None:
            raise ValueError("the model config holds no unet_config")
        network = dm.unet_from_config(self._network_config)
        network.load_state_dict(under_prefix(tensors, "unet"))
        self._network = network.to(self.device).eval().requires_grad_(False)
        self._ratio = tensors["ratio"].float().reshape(())
        self._feature_stats = tensors["feature_stats"].float() if "feature_stats" in tensors else None
        if self.space == "features" and self._feature_stats is None:
            raise ValueError("a feature-space model needs its feature_stats tensor")
        adapted = under_prefix(tensors, "adapted")
        self._adapted = None
        if adapted:
            student = copy.deepcopy(self.extractor)
            student.load_state_dict(adapted)
            self._adapted = student.eval()

    def _extra_config(self) -> dict[str, Any]:
        return super()._extra_config() | {"unet_config": fitted(self, self._network_config)}

    def _check_config(self, config: dict[str, Any], folder: Path) -> None:
        super()._check_config(config, folder)
        self._network_config = config.get("unet_config")


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Optimisation steps taken so far (kept across resumed runs in the optimizer state)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0
