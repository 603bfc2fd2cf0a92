"""The paper's setting: a frozen pretrained latent diffusion model, of which only the learned context trains.

A diffusers-format LDM / Stable Diffusion 1.x folder (``unet/`` UNet2DConditionModel, ``vae/``
AutoencoderKL, ``text_encoder/`` CLIPTextModel + ``tokenizer/``, optionally ``scheduler/`` whose
noise schedule is then used) is loaded and frozen. The text encoder enters once: it encodes the
fixed prompt ``settings.prompt`` (e.g. "a photo of a bottle"), padded to the tokenizer's length
as the UNet saw prompts in training, and the learned anomaly + spatial tokens are appended to
that context at the cross-attention width (they live in the text encoder's *output* space, so no
gradient runs through the text encoder). Only the anomaly tokens and the mask encoder train, with
the paper's masked loss (inside the latent mask only).

Diffusion runs in the VAE's latent space: images are encoded (the posterior mean), the blending
of eq. 1 and the attention re-weighting happen on latents, the result is decoded, and the
generator composites the decoded pixels into the good image inside the full-resolution mask.
The mask model stays the small pixel-space one (masks need no pretrained prior to be learnt).
A saved generator records this folder's path and stores only the trained tensors.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DefectscopeError
from ..nn import diffusion as dm
from .denoising import Denoiser, ddim_sample, masked_error, prediction_error
from .settings import GeneratorSettings

if TYPE_CHECKING:
    from .generator import DefectGenerator

TEXT_HINT = "pip install transformers"
PARTS = ("unet", "vae", "text_encoder", "tokenizer")


def require_transformers() -> ModuleType:
    """The ``transformers`` module, or a clear error saying how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise DefectscopeError(
            f"a pretrained generator needs the transformers package for its text encoder ({exc}); `{TEXT_HINT}`"
        ) from None


def _schedule(folder: Path, settings: GeneratorSettings) -> GeneratorSettings:
    """``settings`` with the noise schedule of ``folder/scheduler`` (the one the UNet was trained with), if any."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return settings
    try:
        config = json.loads(path.read_text())
        return dataclasses.replace(
            settings,
            num_train_timesteps=int(config.get("num_train_timesteps", settings.num_train_timesteps)),
            beta_start=float(config.get("beta_start", settings.beta_start)),
            beta_end=float(config.get("beta_end", settings.beta_end)),
            beta_schedule=str(config.get("beta_schedule", settings.beta_schedule)),
            prediction=str(config.get("prediction_type", "epsilon")),
        )
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise DefectscopeError(f"{path}: not a readable scheduler config ({exc})") from None


@torch.no_grad()
def encode_prompt(folder: Path, text: str) -> torch.Tensor:
    """(L, D) output of the folder's frozen CLIP text encoder for ``text``, padded to the tokenizer's length."""
    transformers = require_transformers()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a weight-loading bar per call is noise
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        encoder = transformers.CLIPTextModel.from_pretrained(
            str(folder / "text_encoder"), local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise DefectscopeError(f"{folder}: cannot load the text encoder ({' '.join(str(exc).split())[:200]})") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    ids = tokenizer(
        text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return encoder.eval()(ids).last_hidden_state[0].float()


class PretrainedLatent:
    """A frozen pretrained UNet + VAE + encoded prompt, and the latent-space training loss and generation."""

    def __init__(
        self, folder: Path, settings: GeneratorSettings, unet: nn.Module, vae: nn.Module, prefix: torch.Tensor
    ) -> None:
        self.folder, self.settings = folder, settings
        self.unet, self.vae, self.prefix = unet, vae, prefix
        config = cast(Any, vae).config
        self.scale = float(config.scaling_factor)
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.abar = dm.alphas_cumprod(
            settings.num_train_timesteps, settings.beta_start, settings.beta_end, settings.beta_schedule
        )
        self._latents: dict[str, torch.Tensor] = {}  # the training images' latents, by path

    @classmethod
    def load(cls, folder: Path, settings: GeneratorSettings) -> PretrainedLatent:
        """Load and freeze the model in ``folder``; a DefectscopeError naming what is missing or does not fit."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise DefectscopeError(f"{folder}: no such pretrained model folder")
        missing = [part for part in PARTS if not (folder / part).is_dir()]
        if missing:
            raise DefectscopeError(
                f"{folder}: no {', '.join(p + '/' for p in missing)} folder; expected a diffusers latent diffusion "
                f"model folder with {', '.join(p + '/' for p in PARTS)}"
            )
        settings = _schedule(folder, settings)
        unet = dm.load_pretrained(folder / "unet", ["UNet2DConditionModel"]).eval().requires_grad_(False)
        vae = dm.load_pretrained(folder / "vae", ["AutoencoderKL"]).eval().requires_grad_(False)
        prefix = encode_prompt(folder, settings.prompt.format(category=settings.category))
        width = int(cast(Any, unet).config.cross_attention_dim)
        if prefix.shape[1] != width:
            raise DefectscopeError(
                f"{folder}: the text encoder gives {prefix.shape[1]}-wide tokens but the UNet attends to {width}"
            )
        latent = cls(folder, settings, unet, vae, prefix)
        levels = len(cast(Any, unet).config.block_out_channels)
        step = latent.factor * 2 ** (levels - 1)
        if settings.image_size % step:
            raise DefectscopeError(f"{folder}: image_size {settings.image_size} must be divisible by {step}")
        return latent

    def to(self, device: torch.device) -> PretrainedLatent:
        """Move the frozen UNet, the VAE, the prompt, the noise schedule and the cached latents to ``device``."""
        self.unet.to(device)
        self.vae.to(device)
        self.prefix, self.abar = self.prefix.to(device), self.abar.to(device)
        self._latents = {path: z.to(device) for path, z in self._latents.items()}
        return self

    @property
    def latent_size(self) -> int:
        return self.settings.image_size // self.factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images (B, 3, s, s) in [-1, 1]: the scaled posterior mean."""
        return cast(Any, self.vae).encode(images).latent_dist.mean * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, s, s) in [-1, 1] of latents."""
        return cast(Any, self.vae).decode(latents / self.scale).sample.clamp(-1, 1)

    def latent_mask(self, mask: torch.Tensor, covering: bool) -> torch.Tensor:
        """(B, 1, h, w) mask at latent size: where any pixel is masked (``covering``), or the majority (training)."""
        small = F.interpolate(mask.float(), size=(self.latent_size, self.latent_size), mode="area")
        return (small > 0 if covering else small >= 0.5).float()

    def loss(self, batch: dict[str, Any], model: Denoiser) -> torch.Tensor:
        """The paper's masked textual inversion loss on the latents of defect images (inside the latent mask)."""

        missing = [i for i, path in enumerate(batch["path"]) if path not in self._latents]
        if missing:
            fresh = self.encode(batch["image"][missing] * 2 - 1)
            self._latents.update({batch["path"][i]: z for i, z in zip(missing, fresh)})
        z0 = torch.stack([self._latents[path] for path in batch["path"]])
        mask = self.latent_mask(batch["mask"][:, None], covering=False)
        error = prediction_error(model, z0, batch["type_index"], mask, self.abar, self.settings.prediction)
        return masked_error(error, mask, batch["type_index"], 0.0)

    def generate(
        self,
        generator: DefectGenerator,
        good: torch.Tensor,
        mask: torch.Tensor,
        types: Sequence[int],
        seeds: Sequence[int],
        reweight: bool,
    ) -> torch.Tensor:
        """(B, 3, s, s) decoded generation for good images (B, 3, s, s) in [-1, 1] and their masks (B, 1, s, s)."""

        z_good = self.encode(good)
        z = ddim_sample(
            generator.image_model,
            self.abar,
            torch.tensor(list(types), device=z_good.device),
            seeds,
            tuple(z_good.shape[1:]),
            generator.settings.sampling_steps,
            prediction=generator.settings.prediction,
            eta=generator.settings.eta,
            good=z_good,
            mask=self.latent_mask(mask, covering=True),
            reweight=generator.reweighting if reweight else None,
        )
        return self.decode(z)
