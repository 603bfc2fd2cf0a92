"""Denoising diffusion pieces shared by the diffusion reconstruction methods (DDAD, GLAD).

The networks and noise schedules come from ``diffusers`` (imported lazily, so the rest of
defectscope works without it); this module adds what the anomaly detection methods need on top:
DDIM steps on per-image timesteps, DDAD's target-conditioned noise, GLAD's noise target for
synthetic anomalies, spatial fusion, the exponential moving average of weights, and the
pixel / feature distances between an image and its reconstruction.

Conventions: model space is [-1, 1] (``x = 2 * image - 1``); ``abar`` is the cumulative product
of ``1 - beta`` (``alphas_cumprod``), broadcast as (B, 1, 1, 1); timestep ``-1`` means "clean"
(abar = 1).
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DefectscopeError
from ..postprocess import gaussian_blur
from .embedding import local_average

INSTALL_HINT = "pip install defectscope[diffusion]"

# UNet2DModel shapes. "ddad" is the paper's UNet (base 64 channels), "ddad_s" its small DDAD-S
# variant (base 32), both with attention at the two lowest resolutions; "small" (base 16, one
# residual block per level, attention at the lowest resolution; about 0.74 GFLOP per 64 px image,
# 5x less than DDAD-S) is what a CPU trains in minutes in pixel space; "features" (base 64, three
# levels) denoises backbone feature maps (an 8 x 8 grid of 152 channels at 64 px); "tiny" is
# for tests and smoke runs.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "ddad": {"base_channels": 64, "channel_mults": (1, 2, 3, 4), "layers_per_block": 2, "attention": 2},
    "ddad_s": {"base_channels": 32, "channel_mults": (1, 2, 3, 4), "layers_per_block": 2, "attention": 2},
    "small": {"base_channels": 16, "channel_mults": (1, 2, 4, 4), "layers_per_block": 1, "attention": 1},
    "features": {"base_channels": 64, "channel_mults": (1, 2, 2), "layers_per_block": 1, "attention": 1},
    "tiny": {"base_channels": 16, "channel_mults": (1, 2), "layers_per_block": 1, "attention": 0},
}

NoiseModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,C,H,W), t (B,)) -> eps


def require_diffusers() -> ModuleType:
    """The ``diffusers`` module, or a clear error saying how to install it."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as exc:
        raise DefectscopeError(
            f"the diffusion methods need the diffusers package ({exc}); install it with `{INSTALL_HINT}`"
        ) from None


# -- networks ------------------------------------------------------------------------------
def build_unet(preset: str, image_size: int, channels: int = 3) -> nn.Module:
    """A freshly initialised diffusers ``UNet2DModel`` of one of :data:`UNET_PRESETS`."""
    if preset not in UNET_PRESETS:
        raise DefectscopeError(f"unknown unet {preset!r} (choose from {', '.join(UNET_PRESETS)})")
    spec = UNET_PRESETS[preset]
    mults = spec["channel_mults"]
    levels = len(mults)
    if image_size % 2 ** (levels - 1):
        raise DefectscopeError(f"unet {preset}: image size {image_size} must be divisible by {2 ** (levels - 1)}")
    with_attention = [i >= levels - spec["attention"] for i in range(levels)]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in with_attention]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)]
    base = spec["base_channels"]
    diffusers = require_diffusers()
    return diffusers.UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(base * m for m in mults),
        layers_per_block=spec["layers_per_block"],
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        attention_head_dim=min(32, base),
        norm_num_groups=min(32, base // 2) if base < 32 else 32,
    )


def unet_config(unet: nn.Module) -> dict[str, Any]:
    """The JSON-able constructor config of a diffusers model (to rebuild it with :func:`unet_from_config`)."""
    config = cast("Mapping[str, Any]", unet.config)  # a diffusers FrozenDict
    return json.loads(json.dumps(dict(config), default=list))


def unet_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild an (uninitialised-weights) ``UNet2DModel`` from :func:`unet_config`'s output."""
    diffusers = require_diffusers()
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise DefectscopeError(f"only diffusers UNet2DModel networks are supported, not {name}")
    return diffusers.UNet2DModel.from_config(config)


def load_pretrained(folder: str | Path, kinds: Sequence[str]) -> nn.Module:
    """A diffusers model saved with ``save_pretrained`` in ``folder`` (local files only).

    ``kinds`` lists the accepted diffusers class names (from ``config.json``'s ``_class_name``).
    """
    folder = Path(folder).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DefectscopeError(f"{folder}: no config.json; expected a folder written by diffusers' save_pretrained")
    try:
        name = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DefectscopeError(f"{config_path}: not valid JSON ({exc})") from None
    if name not in kinds:
        raise DefectscopeError(f"{folder}: holds a {name}, expected one of {', '.join(kinds)}")
    diffusers = require_diffusers()
    try:
        return getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise DefectscopeError(f"{folder}: cannot load the {name} ({exc})") from None


def unet_noise_model(unet: nn.Module) -> NoiseModel:
    """Wrap a diffusers UNet as ``eps = model(x_t, t)``."""

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t.clamp(min=0)).sample

    return predict


def sample_noise_model(unet: nn.Module, abar: torch.Tensor) -> NoiseModel:
    """Wrap a UNet that predicts the clean sample ``x0`` as the noise model
    ``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``."""

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar_t = gather_abar(abar, t)
        return (x - abar_t.sqrt() * unet(x, t.clamp(min=0)).sample) / (1 - abar_t).sqrt()

    return predict


def prediction_loss(
    pred: torch.Tensor,
    target_x0: torch.Tensor,
    target_eps: torch.Tensor,
    abar_t: torch.Tensor,
    kind: str,
    max_weight: float = 5.0,
) -> torch.Tensor:
    """(B, C, H, W) squared error of a UNet output: of the noise (``kind="epsilon"``), or of the clean
    sample (``"sample"``) weighted by the signal-to-noise ratio ``abar / (1 - abar)`` clipped at
    ``max_weight``, the clean-sample loss that equals the noise loss where that ratio is 1."""
    if kind == "epsilon":
        return (pred - target_eps).pow(2)
    return (pred - target_x0).pow(2) * (abar_t / (1 - abar_t)).clamp(max=max_weight)


class EMA(nn.Module):
    """Exponential moving average of a network's weights (the copy used for sampling).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so a short training
    run is not dominated by its random initialisation.
    """

    updates: torch.Tensor  # buffer: the number of updates so far

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise DefectscopeError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for ema, live in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(live.detach(), 1.0 - decay)
        for ema_buffer, live_buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(live_buffer)
        self.updates += 1

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.model.eval()  # the averaged copy is only ever evaluated
        return self


# -- noise schedule and DDIM -----------------------------------------------------------------
def alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, beta_schedule: str = "linear"
) -> torch.Tensor:
    """(T,) cumulative products of ``1 - beta_t`` of diffusers' DDPM schedule (DDAD: linear 1e-4..0.02, T=1000)."""
    diffusers = require_diffusers()
    try:
        scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
        )
    except NotImplementedError as exc:
        raise DefectscopeError(f"beta_schedule {beta_schedule!r}: {exc}") from None
    return scheduler.alphas_cumprod.float().clone()


def gather_abar(abar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) ``abar[t]`` for timesteps (B,), with 1 where ``t < 0`` (the clean image)."""
    values = abar.to(t.device)[t.clamp(min=0)]
    return torch.where(t < 0, torch.ones_like(values), values).view(-1, 1, 1, 1)


def ddim_timesteps(t_start: torch.Tensor, n_steps: int) -> torch.Tensor:
    """(n_steps + 1, B) descending DDIM trajectories: row k is ``round(t_start * (n - k) / n) - 1``.

    Each image may start at its own step; the last row is -1 (the clean image). With
    ``t_start = 250`` and 10 steps this is 249, 224, ..., 24, -1.
    """
    if n_steps < 1:
        raise DefectscopeError(f"the number of denoising steps must be at least 1, got {n_steps}")
    t_start = torch.as_tensor(t_start).long().reshape(-1)
    fractions = torch.arange(n_steps, -1, -1, device=t_start.device, dtype=torch.float64) / n_steps
    return (t_start[None].double() * fractions[:, None]).round().long() - 1


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Forward diffusion ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The clean image implied by noise ``eps``: ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    abar_t: torch.Tensor,
    abar_prev: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update from step t to the earlier step with ``abar_prev`` (Song et al. 2021, eq. 12).

    ``eta = 0`` is deterministic; ``eta = 1`` has the DDPM posterior variance and needs ``noise``.
    """
    x0 = predicted_x0(x_t, eps, abar_t)
    sigma2 = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma2.sqrt() * noise
    return x_prev


def conditioned_noise(
    eps: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor, abar_t: torch.Tensor, w: float
) -> torch.Tensor:
    """DDAD's target-conditioned noise ``eps - w sqrt(1 - abar_t) (y_t - x_t)``.

    ``y_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps`` is the target image ``y`` noised with the
    predicted noise, so the step is pulled towards the target by ``w``; ``w = 0`` is plain DDIM.
    """
    y_t = add_noise(y, eps, abar_t)
    return eps - w * (1 - abar_t).sqrt() * (y_t - x_t)


def spatial_fusion(inputs: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * reconstruction + (1 - mask) * inputs``: where the mask is 0 the input is kept.

    ``mask`` is (B, h, w) or (B, 1, h, w) in [0, 1], resized (bilinearly) to the inputs' grid.
    """
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.shape[-2:] != inputs.shape[-2:]:
        mask = F.interpolate(mask.float(), size=inputs.shape[-2:], mode="bilinear", align_corners=False)
    mask = mask.to(inputs.dtype)
    return mask * reconstruction + (1 - mask) * inputs


def anomaly_noise_target(
    eps: torch.Tensor, x_input: torch.Tensor, x_normal: torch.Tensor, abar_t: torch.Tensor
) -> torch.Tensor:
    """The noise that leads ``x_t = add_noise(x_input, eps, abar_t)`` back to ``x_normal`` (GLAD's local adaptivity).

    It is ``(x_t - sqrt(abar_t) x_normal) / sqrt(1 - abar_t) = eps + sqrt(abar_t / (1 - abar_t)) (x_input - x_normal)``:
    standard noise where the input is normal, noise that carries (and so removes) the anomaly where
    it is not.
    """
    return eps + (abar_t / (1 - abar_t)).sqrt() * (x_input - x_normal)


def discrepancy_score(discrepancy: torch.Tensor, top: float = 0.01) -> torch.Tensor:
    """(B,) mean of the highest ``top`` fraction of each (B, h, w) discrepancy map.

    A global measure of how far an image is from the model's prior that a small defect still
    raises (the mean over the whole image would drown it).
    """
    flat = discrepancy.flatten(1)
    k = max(1, round(top * int(flat.shape[1])))  # int: a traced size is a tensor
    return flat.topk(k, dim=1).values.mean(1)


def adaptive_steps(
    scores: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor, t_min: int, t_max: int
) -> torch.Tensor:
    """(B,) denoising start steps, linear in ``scores`` from ``t_min`` (at ``low``) to ``t_max`` (at ``high``).

    Scores below ``low`` (typical of good images) get ``t_min``, above ``high`` get ``t_max``: an
    image far from the prior is noised more so that denoising can remove what is wrong with it.
    """
    span = torch.as_tensor(high, dtype=scores.dtype, device=scores.device) - low
    fraction = ((scores - low) / span.clamp(min=1e-12)).clamp(0, 1)
    return (t_min + fraction * (t_max - t_min)).round().long()


def fusion_mask(discrepancy: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor) -> torch.Tensor:
    """(B, h, w) soft abnormality mask in [0, 1]: 0 up to ``low``, 1 from ``high``, linear between."""
    span = torch.as_tensor(high, dtype=discrepancy.dtype, device=discrepancy.device) - low
    return ((discrepancy - low) / span.clamp(min=1e-12)).clamp(0, 1)


@lru_cache(maxsize=8)
def _seeded_noise(shape: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator) for _ in range(n))


def fixed_noise(shape: Sequence[int], n: int, seed: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """``n`` seeded standard normal tensors of ``shape`` (the same for every call with this seed; not to be
    changed in place). Drawn once and kept, so that tracing a caller for export records them as constants."""
    return [t.to(device) for t in _seeded_noise(tuple(int(s) for s in shape), n, seed)]


def ddim_denoise(
    model: NoiseModel,
    y: torch.Tensor,
    t_start: torch.Tensor | int,
    n_steps: int,
    abar: torch.Tensor,
    *,
    w: float = 0.0,
    eta: float = 0.0,
    seed: int = 0,
    fuse: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Noise ``y`` (model space) to ``t_start`` (per image or one for all) and denoise it in ``n_steps`` DDIM steps.

    With ``w > 0`` each step uses DDAD's :func:`conditioned_noise` towards ``y``. ``fuse(x_prev,
    y_prev, x0_hat)`` may replace each new state (GLAD's spatial fusion), where ``y_prev`` is the
    input noised to the same level with the same predicted noise. The noise fields are seeded and
    shared by all images of the batch, so a result does not depend on the batch it was in.
    """
    b = y.shape[0]
    t_start = torch.as_tensor(t_start, device=y.device).long().reshape(-1).expand(b)
    steps = ddim_timesteps(t_start, n_steps)
    noises = fixed_noise((1, *y.shape[1:]), n_steps + 1, seed, y.device)
    x = add_noise(y, noises[0], gather_abar(abar, steps[0]))
    for k in range(n_steps):
        abar_t, abar_prev = gather_abar(abar, steps[k]), gather_abar(abar, steps[k + 1])
        eps = model(x, steps[k])
        if w:
            eps = conditioned_noise(eps, x, y, abar_t, w)
        x_next = ddim_step(x, eps, abar_t, abar_prev, eta, noises[k + 1])
        if fuse is not None:
            x_next = fuse(x_next, add_noise(y, eps, abar_prev), predicted_x0(x, eps, abar_t))
        # an image whose trajectory is shorter (repeated steps) stays where it is
        x = torch.where((steps[k] == steps[k + 1]).view(-1, 1, 1, 1), x, x_next)
    return x


# -- distances between an image and its reconstruction ----------------------------------------
def pixel_distance(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """(B, H, W) channel-mean absolute difference (DDAD's Dp)."""
    return (images - reconstructions).abs().mean(1)


def feature_distance(
    features: Sequence[torch.Tensor], reconstructed: Sequence[torch.Tensor], size: tuple[int, ...], pool: int = 3
) -> torch.Tensor:
    """(B, H, W) sum over layers of ``1 - cos`` between locally pooled features, upsampled to ``size`` (DDAD's Df)."""
    total = None
    for a, b in zip(features, reconstructed):
        cos = F.cosine_similarity(local_average(a, pool), local_average(b, pool), dim=1)
        part = F.interpolate((1 - cos)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        total = part if total is None else total + part
    if total is None:
        raise ValueError("feature_distance needs at least one feature layer")
    return total


def combine_distances(
    dp: torch.Tensor, df: torch.Tensor, v: float, ratio: float | torch.Tensor, sigma: float
) -> torch.Tensor:
    """DDAD's anomaly map ``v * ratio * Dp + Df`` (ratio = max(Df) / max(Dp)), then Gaussian smoothing."""
    return gaussian_blur(v * ratio * dp + df, sigma)
