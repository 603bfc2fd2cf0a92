"""The generator's denoiser: a conditional UNet, its losses and DDIM sampling with eq. 1's blending."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DefectscopeError
from ..nn import diffusion as dm
from .attention import AttentionWeights, adaptive_weights
from .settings import GeneratorSettings
from .tokens import DefectTokens


# -- networks ----------------------------------------------------------------------------------
def build_unet(settings: GeneratorSettings, channels: int, size: int, widths: tuple[int, ...]) -> nn.Module:
    """A freshly initialised diffusers ``UNet2DConditionModel`` with cross-attention at the lowest resolutions."""
    levels = len(widths)
    attention = [i >= levels - settings.attention_levels for i in range(levels)]
    diffusers = dm.require_diffusers()
    return diffusers.UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        layers_per_block=settings.layers_per_block,
        cross_attention_dim=settings.cross_attention_dim,
        attention_head_dim=settings.attention_heads,
        norm_num_groups=min(32, math.gcd(*widths)),
    )


def unet_file_config(unet: nn.Module) -> dict[str, Any]:
    return dm.unet_config(unet) | {"_class_name": type(unet).__name__}


def unet_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a ``UNet2DConditionModel`` (weights uninitialised) from :func:`defectscope.nn.diffusion.unet_config`."""
    if config.get("_class_name") != "UNet2DConditionModel":
        raise DefectscopeError(f"expected a UNet2DConditionModel config, got {config.get('_class_name')!r}")
    return dm.require_diffusers().UNet2DConditionModel.from_config(config)


class Denoiser(nn.Module):
    """Noise prediction ``eps(x_t, t | type, mask)``: a conditional UNet and the tokens of its context.

    ``prefix`` (L0, D), when given, is a fixed context (an encoded prompt) placed before the learned
    tokens; the anomaly tokens then sit at :attr:`anomaly_slice`.
    """

    prefix: torch.Tensor | None

    def __init__(self, unet: nn.Module, tokens: DefectTokens, prefix: torch.Tensor | None = None) -> None:
        super().__init__()
        self.unet, self.tokens = unet, tokens
        self.register_buffer("prefix", prefix, persistent=False)

    @property
    def anomaly_slice(self) -> slice:
        start = 0 if self.prefix is None else self.prefix.shape[0]
        return slice(start, start + self.tokens.anomaly_tokens)

    def context(self, types: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        context = self.tokens(types, masks)
        if self.prefix is not None:
            prefix = self.prefix.to(context.dtype).expand(context.shape[0], -1, -1)
            context = torch.cat([prefix, context], dim=1)
        return context

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, types: torch.Tensor, masks: torch.Tensor | None
    ) -> torch.Tensor:
        return self.unet(x, t.clamp(min=0), encoder_hidden_states=self.context(types, masks)).sample


def predicted_clean(output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction: str) -> torch.Tensor:
    """The clean image x̂0 implied by the UNet's ``output`` at ``x_t`` for its kind of ``prediction``."""
    if prediction == "sample":
        return output
    if prediction == "epsilon":
        return dm.predicted_x0(x_t, output, abar_t)
    return abar_t.sqrt() * x_t - (1 - abar_t).sqrt() * output


def training_target(x0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the UNet learns to output for ``x_t = add_noise(x0, eps, abar_t)``: x0, eps or v."""
    if prediction == "sample":
        return x0
    if prediction == "epsilon":
        return eps
    return abar_t.sqrt() * eps - (1 - abar_t).sqrt() * x0


def prediction_error(
    model: Denoiser,
    x0: torch.Tensor,
    types: torch.Tensor,
    masks: torch.Tensor | None,
    abar: torch.Tensor,
    prediction: str,
) -> torch.Tensor:
    """(B, 1, H, W) channel-mean squared error of the model at a uniform random timestep and Gaussian noise."""
    t = torch.randint(0, len(abar), (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    abar_t = dm.gather_abar(abar, t)
    output = model(dm.add_noise(x0, eps, abar_t), t, types, masks)
    return (output - training_target(x0, eps, abar_t, prediction)).pow(2).mean(1, keepdim=True)


def image_loss(batch: dict[str, Any], model: Denoiser, abar: torch.Tensor, settings: GeneratorSettings) -> torch.Tensor:
    """Masked textual inversion: the squared noise-prediction error weighted as :func:`masked_error` weights it."""
    x0 = batch["image"] * 2 - 1
    mask = batch["mask"][:, None].float()
    types = batch["type_index"]
    error = prediction_error(model, x0, types, mask, abar, settings.prediction)
    return masked_error(error, mask, types, settings.outside_weight)


def masked_error(error: torch.Tensor, mask: torch.Tensor, types: torch.Tensor, outside_weight: float) -> torch.Tensor:
    """Batch mean of ``sum(w * error) / sum(w)`` per image, for (B, 1, H, W) errors and masks and (B,) type indices.

    ``w`` is 1 everywhere on good images (type -1); on defect images 1 inside the mask, ``outside_weight`` outside.
    """
    defect = (types >= 0).view(-1, 1, 1, 1)
    weight = torch.where(defect, mask + outside_weight * (1 - mask), torch.ones_like(mask))
    return ((error * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp(min=1e-12)).mean()


def mask_loss(batch: dict[str, Any], model: Denoiser, abar: torch.Tensor, settings: GeneratorSettings) -> torch.Tensor:
    """Noise-prediction loss on the masks (as images in [-1, 1]) under their type's tokens; random flips."""
    x0 = batch["mask"][:, None].float() * 2 - 1
    if settings.mask_flips:
        flip_h, flip_v = torch.rand(2, x0.shape[0], 1, 1, 1, device=x0.device) < 0.5
        x0 = torch.where(flip_h, x0.flip(-1), x0)
        x0 = torch.where(flip_v, x0.flip(-2), x0)
    return prediction_error(model, x0, batch["type_index"], None, abar, settings.prediction).mean()


class _Noise:
    """Per-image seeded noise: image i's draws depend on its seed only, not on the batch it is in.

    The draws are made on the CPU and then moved to ``device``, so they do not depend on the device.
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = shape, device

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


#: ``eps = model(x_t, t, types, masks)``: what :func:`ddim_sample` denoises with (a :class:`Denoiser`).
NoiseModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def ddim_sample(
    model: NoiseModel,
    abar: torch.Tensor,
    types: torch.Tensor,
    seeds: Sequence[int],
    shape: tuple[int, ...],
    steps: int,
    *,
    prediction: str = "epsilon",
    eta: float = 0.0,
    good: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reweight: AttentionWeights | None = None,
) -> torch.Tensor:
    """DDIM from pure noise to x0 (B, *shape) in [-1, 1]; given ``good`` and ``mask`` (B, 1, h, w), eq. 1's blending.

    Each step predicts x̂0 (clipped to [-1, 1]) and steps from it. When blending, the state outside
    the mask is replaced by the good image noised to the step before the model sees it, and the
    result outside the mask is the good image itself. ``reweight`` (the attention processors'
    state) receives the eq. 7 weight map from the previous step's x̂0. Runs on ``abar``'s device (all
    tensors given must be there); the seeded noise is drawn on the CPU whatever the device.
    """
    noise = _Noise(seeds, shape, abar.device)
    t_start = torch.full((len(seeds),), len(abar), device=abar.device)
    trajectory = dm.ddim_timesteps(t_start, steps)
    x = noise()
    x0_hat: torch.Tensor | None = None
    try:
        for k in range(steps):
            abar_t, abar_prev = dm.gather_abar(abar, trajectory[k]), dm.gather_abar(abar, trajectory[k + 1])
            if good is not None and mask is not None:
                x = mask * x + (1 - mask) * dm.add_noise(good, noise(), abar_t)
                if reweight is not None and x0_hat is not None:
                    reweight.weights = adaptive_weights(x0_hat, good, mask)
            output = model(x, trajectory[k], types, mask)
            x0_hat = predicted_clean(output, x, abar_t, prediction).clamp(-1, 1)
            eps = (x - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
            x = dm.ddim_step(x, eps, abar_t, abar_prev, eta, noise() if eta > 0 else None)
    finally:
        if reweight is not None:
            reweight.weights = None
    if good is not None and mask is not None:
        x = mask * x + (1 - mask) * good
    return x.clamp(-1, 1)


def covering_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """(1, size, size) float mask that is 1 wherever any pixel of the full-resolution ``mask`` falls."""
    full = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return (F.interpolate(full, size=(size, size), mode="area") > 0).float()[0]


def image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """(3, size, size) float in [-1, 1] of an (H, W, 3) uint8 image, resized bilinearly with antialiasing."""
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    small = F.interpolate(chw, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return small[0] / 127.5 - 1


def composite(good: np.ndarray, mask: np.ndarray, generated: torch.Tensor) -> np.ndarray:
    """``good`` with the model-size ``generated`` (3, h, w in [-1, 1]) upsampled into it where ``mask`` is True."""
    height, width = mask.shape
    up = F.interpolate(generated[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    pixels = ((up + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.where(mask[:, :, None], pixels, good)
