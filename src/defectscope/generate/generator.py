"""AnomalyDiffusion's generator core: fit on good images + a few labelled defects, generate defects in given masks.

Two diffusion models are fitted per category (Hu et al. 2024, arXiv 2312.05767):

* the **image model** denoises images conditioned on the spatial anomaly embedding of
  :mod:`~defectscope.generate.tokens` (per-type anomaly tokens + spatial tokens from the mask).
  Defect images are trained with *masked textual inversion*: the denoising loss counts inside
  the defect mask (and, with :attr:`GeneratorSettings.outside_weight`, a little outside).
  Trained from scratch (the default: a small pixel-space ``UNet2DConditionModel``), the UNet also
  has to learn the good surface, so good images are trained with the full-image loss under a
  learned good context. From a pretrained latent diffusion model
  (:mod:`~defectscope.generate.pretrained`) only the tokens and the mask encoder train.
* the **mask model** learns per-type tokens on the masks of each type (one channel, no spatial
  encoder) and samples new masks as probability maps.

Generation blends (paper eq. 1): at every DDIM step, inside the mask the model's step, outside
it the good image noised to that step; the model-size result is upsampled and composited into
the full-resolution good image inside the full-resolution mask only, so every pixel outside the
mask equals the good image exactly. With ``adaptive_attention`` the anomaly tokens' attention is
re-weighted at every step (:mod:`~defectscope.generate.attention`).

Both fitting and generation run on a torch ``device`` (``cpu`` or ``cuda``), a property of the run,
not of the generator: the saved files are the same whatever the device, and the seeded noise of
generation is drawn on the CPU, so a seed gives the same noise on every device.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .. import __version__
from ..checkpoint import sha256_file, write_hashed_pair
from ..data import ImageDataset, Sample
from ..devices import check_device
from ..errors import DefectscopeError, ModelFileError
from ..methods.model_file import check_tensors_finite, read_json
from ..nn import diffusion as dm
from ..nn.state import under_prefix, with_prefix
from ..outputs import json_text, make_folder
from ..progress import Log, quiet
from ..training import CachedImages, Trainer, TrainingLog, shuffled_batches
from .attention import install_reweighting
from .defects import DefectExample
from .denoising import (
    Denoiser,
    build_unet,
    composite,
    covering_mask,
    ddim_sample,
    image_loss,
    image_tensor,
    mask_loss,
    unet_file_config,
    unet_from_config,
)
from .settings import GeneratorSettings
from .tokens import DefectTokens

FORMAT = "defectscope-generator"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_FILE = "generator.safetensors"
GENERATE_BATCH = 8  # images denoised together


def _on(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on ``device`` (paths and other lists as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -- training data ---------------------------------------------------------------------------------
class _TypedItems:
    """Cached images with a type index (-1 good) per item; defects repeated ``repeats`` times per epoch."""

    def __init__(self, good: CachedImages | None, defects: CachedImages, type_index: list[int], repeats: int) -> None:
        self.good, self.defects, self.type_index, self.repeats = good, defects, type_index, repeats
        self.n_good = len(good) if good is not None else 0

    def __len__(self) -> int:
        return self.n_good + self.repeats * len(self.defects)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < self.n_good and self.good is not None:
            item = self.good[index]
            return {"image": item["image"], "mask": item["mask"], "type_index": -1, "path": item["path"]}
        i = (index - self.n_good) % len(self.defects)
        item = self.defects[i]
        return {"image": item["image"], "mask": item["mask"], "type_index": self.type_index[i], "path": item["path"]}


def _cache(samples: list[Sample], size: int) -> CachedImages:
    return CachedImages(ImageDataset(samples, size), desc=None)


def _defect_samples(defects: dict[str, list[DefectExample]]) -> tuple[list[Sample], list[int]]:
    samples, index = [], []
    for i, name in enumerate(defects):
        for example in defects[name]:
            samples.append(Sample(Path(example.image), 1, name, Path(example.mask), ""))
            index.append(i)
    return samples, index


def _train(
    name: str,
    model: Denoiser,
    trainable: nn.Module,
    items: _TypedItems,
    loss: Callable[[dict[str, Any], Denoiser], torch.Tensor],
    settings: GeneratorSettings,
    epochs: int,
    budget: float | None,
    checkpoint_dir: Path | None,
    resume: bool,
    identity: dict[str, Any],
    device: torch.device,
) -> tuple[TrainingLog, int]:
    """Train the ``trainable`` part of ``model`` (on ``device``) with the shared Trainer (log, optimiser steps).

    Only ``trainable`` is averaged and checkpointed (a frozen pretrained UNet is neither); at the end
    it holds the averaged weights and ``model`` is ready to sample with. Batches move to ``device``.
    """
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=settings.lr, weight_decay=0.0)
    modules: dict[str, nn.Module] = {name: trainable}
    ema = None
    if settings.ema_decay > 0:
        ema = dm.EMA(trainable, settings.ema_decay)
        modules["ema"] = ema
        optimizer.register_step_post_hook(lambda *_: ema.update(trainable))
    trainer = Trainer(
        modules,
        optimizer,
        epochs=epochs,
        seed=settings.seed,
        time_budget=budget,
        checkpoint_dir=checkpoint_dir / name if checkpoint_dir is not None else None,
        resume=resume,
        identity=identity | {"model": name},
        desc=f"training the {name} model",
        max_grad_norm=1.0,
    )
    log = trainer.run(
        lambda epoch: shuffled_batches(items, settings.batch_size, seed=settings.seed, epoch=epoch),
        lambda batch: loss(_on(batch, device), model),
    )
    steps = next((int(s["step"]) for s in optimizer.state.values() if "step" in s), 0)
    if ema is not None:
        trainable.load_state_dict(ema.model.state_dict())
    model.eval().requires_grad_(False)
    return log, steps


def defect_repeats(n_good: int, n_defects: int, share: float) -> int:
    """How often each defect image is repeated per epoch so that defects make about ``share`` of it."""
    return max(1, round(share / (1 - share) * n_good / max(n_defects, 1)))


# -- sampling -------------------------------------------------------------------------------------------


# -- the generator -------------------------------------------------------------------------------------
class DefectGenerator:
    """A fitted image model + mask model for the defect types of one category; see the module docstring."""

    def __init__(
        self,
        settings: GeneratorSettings,
        defect_types: list[str],
        image_model: Denoiser,
        mask_model: Denoiser,
        fit_info: dict[str, Any],
        *,
        pretrained: Path | None = None,
        latent: Any = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.settings, self.defect_types = settings, list(defect_types)
        self.image_model, self.mask_model = image_model.eval(), mask_model.eval()
        self.fit_info = fit_info
        self.pretrained = pretrained
        self.latent = latent  # the frozen VAE of a pretrained model (None: pixel space)
        self.abar = dm.alphas_cumprod(
            settings.num_train_timesteps, settings.beta_start, settings.beta_end, settings.beta_schedule
        )
        self.reweighting = install_reweighting(self.image_model.unet, self.image_model.anomaly_slice)
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device: str | torch.device) -> DefectGenerator:
        """Generate on ``device`` (cpu, cuda, cuda:N); images in and out stay numpy arrays."""
        self.device = check_device(device)
        self.image_model.to(self.device)
        self.mask_model.to(self.device)
        self.abar = self.abar.to(self.device)
        if self.latent is not None:
            self.latent.to(self.device)
        return self

    # -- generation -----------------------------------------------------------------------------------
    def type_index(self, defect_type: str) -> int:
        """Index of a defect type; a DefectscopeError naming the known ones otherwise."""
        if defect_type not in self.defect_types:
            raise DefectscopeError(f"unknown defect type {defect_type!r} (known: {', '.join(self.defect_types)})")
        return self.defect_types.index(defect_type)

    def generate(
        self,
        goods: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        defect_types: Sequence[str],
        seeds: Sequence[int],
        *,
        adaptive_attention: bool | None = None,
    ) -> list[np.ndarray]:
        """Each good (H, W, 3) uint8 image with a defect of its type generated inside its (H, W) bool mask.

        Returns (H, W, 3) uint8 images equal to the good image at every pixel outside the mask.
        """
        if not len(goods) == len(masks) == len(defect_types) == len(seeds):
            raise DefectscopeError(
                f"generate needs as many masks, defect types and seeds as good images, got "
                f"{len(goods)}, {len(masks)}, {len(defect_types)}, {len(seeds)}"
            )
        for i, (good, mask) in enumerate(zip(goods, masks)):
            if good.dtype != np.uint8 or good.ndim != 3 or good.shape[2] != 3:
                raise DefectscopeError(f"good image {i}: expected (H, W, 3) uint8, got {good.shape} {good.dtype}")
            if mask.shape != good.shape[:2]:
                raise DefectscopeError(f"mask {i}: shape {mask.shape} differs from its image's {good.shape[:2]}")
        masks = [np.asarray(m).astype(bool) for m in masks]
        types = [self.type_index(t) for t in defect_types]
        reweight = self.settings.adaptive_attention if adaptive_attention is None else adaptive_attention
        out: list[np.ndarray] = []
        for start in range(0, len(goods), GENERATE_BATCH):
            part = slice(start, start + GENERATE_BATCH)
            generated = self._generate_batch(goods[part], masks[part], types[part], seeds[part], reweight)
            out.extend(composite(g, m, x) for g, m, x in zip(goods[part], masks[part], generated))
        return out

    def _generate_batch(
        self,
        goods: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        types: Sequence[int],
        seeds: Sequence[int],
        reweight: bool,
    ) -> torch.Tensor:
        """(B, 3, s, s) in [-1, 1] on the CPU: content generated at model size (decoded latents when pretrained)."""
        size = self.settings.image_size
        good = torch.stack([image_tensor(g, size) for g in goods]).to(self.device)
        mask = torch.stack([covering_mask(m, size) for m in masks]).to(self.device)
        if self.latent is not None:
            return cast(torch.Tensor, self.latent.generate(self, good, mask, types, seeds, reweight)).cpu()
        return ddim_sample(
            self.image_model,
            self.abar,
            torch.tensor(list(types), device=self.device),
            seeds,
            tuple(good.shape[1:]),
            self.settings.sampling_steps,
            prediction=self.settings.prediction,
            eta=self.settings.eta,
            good=good,
            mask=mask,
            reweight=self.reweighting if reweight else None,
        ).cpu()

    def generate_masks(self, defect_type: str, count: int, seed: int, size: int) -> list[np.ndarray]:
        """``count`` new mask probability maps of ``defect_type``: float32 (size, size) in [0, 1]."""
        index = self.type_index(defect_type)
        if count < 0 or size < 1:
            raise DefectscopeError(f"generate_masks needs count >= 0 and size >= 1, got {count} and {size}")
        seeds = [int(s) for s in np.random.SeedSequence([seed, index]).generate_state(count)] if count else []
        shape = (1, self.settings.mask_size, self.settings.mask_size)
        out: list[np.ndarray] = []
        for start in range(0, count, GENERATE_BATCH):
            part = seeds[start : start + GENERATE_BATCH]
            x = ddim_sample(
                self.mask_model,
                self.abar,
                torch.full((len(part),), index, device=self.device),
                part,
                shape,
                self.settings.sampling_steps,
                prediction=self.settings.prediction,
                eta=self.settings.eta,
            )
            probs = F.interpolate((x + 1) / 2, size=(size, size), mode="bilinear", align_corners=False).cpu()
            out.extend(p[0].clamp(0, 1).numpy().astype(np.float32) for p in probs)
        return out

    # -- files ---------------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        image = with_prefix("image.tokens", self.image_model.tokens)
        if self.pretrained is None:
            image |= with_prefix("image.unet", self.image_model.unet)
        return image | with_prefix("mask", self.mask_model)

    def save(self, folder: Path) -> None:
        """Write ``config.json`` + ``generator.safetensors`` into ``folder`` (tensors first, the config last)."""
        folder = Path(folder)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._tensors().items()}
        check_tensors_finite(tensors, f"{folder}: cannot save the generator")
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "defectscope_version": __version__,
            "settings": self.settings.to_dict(),
            "defect_types": self.defect_types,
            "pretrained": str(self.pretrained) if self.pretrained is not None else None,
            "image_unet": unet_file_config(self.image_model.unet) if self.pretrained is None else None,
            "mask_unet": unet_file_config(self.mask_model.unet),
            "fit_info": self.fit_info,
            "tensors_sha256": "",
        }
        make_folder(folder, "the generator")
        write_hashed_pair(folder, TENSORS_FILE, tensors, CONFIG_FILE, config, json_text)

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu") -> DefectGenerator:
        """Rebuild a generator from its folder, on ``device``; a ModelFileError naming the file for anything wrong."""
        device = check_device(device)
        folder = Path(folder)
        config_path, tensors_path = folder / CONFIG_FILE, folder / TENSORS_FILE
        config = read_config(folder)
        if not tensors_path.is_file():
            raise ModelFileError(f"{tensors_path}: missing")
        if sha256_file(tensors_path) != config["tensors_sha256"]:
            raise ModelFileError(f"{tensors_path}: checksum does not match {CONFIG_FILE}; the file was changed")
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f"{tensors_path}: cannot be read ({exc})") from None
        check_tensors_finite(tensors, str(tensors_path))
        try:
            settings = GeneratorSettings.from_dict(config["settings"])
        except (DefectscopeError, TypeError) as exc:
            raise ModelFileError(f"{config_path}: settings: {exc}") from None
        types_ = config["defect_types"]
        latent = None
        if config["pretrained"] is not None:
            from .pretrained import PretrainedLatent

            latent = PretrainedLatent.load(Path(config["pretrained"]), settings)
        try:
            mask_model = _mask_denoiser(settings, len(types_), unet_from_config(config["mask_unet"]))
            mask_model.load_state_dict(under_prefix(tensors, "mask"))
            if latent is not None:
                image_model = _image_denoiser(settings, len(types_), latent.unet, latent.prefix)
            else:
                image_model = _image_denoiser(settings, len(types_), unet_from_config(config["image_unet"]))
                image_model.unet.load_state_dict(under_prefix(tensors, "image.unet"))
            image_model.tokens.load_state_dict(under_prefix(tensors, "image.tokens"))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            message = " ".join(str(exc).split())[:300]
            raise ModelFileError(f"{tensors_path}: tensors do not fit the generator config ({message})") from None
        pretrained = Path(config["pretrained"]) if latent is not None else None
        return cls(
            settings,
            types_,
            image_model,
            mask_model,
            config["fit_info"],
            pretrained=pretrained,
            latent=latent,
            device=device,
        )


def read_config(folder: Path) -> dict[str, Any]:
    """A generator folder's checked ``config.json`` (settings, types, fit_info) without building its models."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: no such generator folder")
    if not config_path.is_file():
        raise ModelFileError(f"{config_path}: missing; is {folder} a folder written by DefectGenerator.save?")
    config = read_json(config_path)
    _check_config(config, config_path)
    return cast(dict[str, Any], config)


def _check_config(config: Any, path: Path) -> None:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a defectscope generator config")
    version = config.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ModelFileError(f"{path}: unsupported format_version {version!r} (this defectscope reads 1)")
    kinds: dict[str, type | tuple[type, ...]] = {
        "settings": dict,
        "defect_types": list,
        "mask_unet": dict,
        "fit_info": dict,
        "tensors_sha256": str,
        "pretrained": (str, type(None)),
        "image_unet": (dict, type(None)),
    }
    for key, kind in kinds.items():
        if key not in config:
            raise ModelFileError(f"{path}: {key}: missing")
        if not isinstance(config[key], kind):
            raise ModelFileError(f"{path}: {key} has the wrong type ({type(config[key]).__name__})")
    if not config["defect_types"] or not all(isinstance(t, str) for t in config["defect_types"]):
        raise ModelFileError(f"{path}: defect_types must be a non-empty list of names")
    if (config["pretrained"] is None) == (config["image_unet"] is None):
        raise ModelFileError(f"{path}: exactly one of pretrained and image_unet must be given")


def _image_denoiser(
    settings: GeneratorSettings, n_types: int, unet: nn.Module, prefix: torch.Tensor | None = None
) -> Denoiser:
    dim = int(cast(Any, unet).config.cross_attention_dim)
    tokens = DefectTokens(n_types, dim, settings.anomaly_tokens, settings.spatial_tokens, good_context=prefix is None)
    return Denoiser(unet, tokens, prefix)


def _mask_denoiser(settings: GeneratorSettings, n_types: int, unet: nn.Module) -> Denoiser:
    return Denoiser(unet, DefectTokens(n_types, settings.cross_attention_dim, settings.anomaly_tokens))


def fit_generator(
    good: Sequence[Path],
    defects: dict[str, list[DefectExample]],
    settings: GeneratorSettings,
    *,
    pretrained: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    log: Log = quiet,
    device: str | torch.device = "cpu",
) -> DefectGenerator:
    """Fit the image model and the mask model on good images and labelled defects per type (kept in the given order).

    From a ``pretrained`` folder only the defects are learnt from (the paper): ``good`` is not used.
    The models train on ``device`` (networks are initialised on the CPU first) and the generator stays there.
    """
    device = check_device(device)
    if not defects:
        raise DefectscopeError("fit_generator needs at least one defect type with labelled defects")
    empty = [name for name, examples in defects.items() if not examples]
    if empty:
        raise DefectscopeError(f"defect type(s) {', '.join(empty)}: no labelled defects to learn from")
    if pretrained is not None:
        good = []
    if pretrained is None and len(good) < 1:
        raise DefectscopeError("fit_generator needs good images to learn the good surface from scratch")
    started = time.monotonic()
    torch.manual_seed(settings.seed)
    types_ = list(defects)
    counts = {name: len(examples) for name, examples in defects.items()}
    identity = {"settings": settings.to_dict(), "defects": counts, "good": len(good), "pretrained": str(pretrained)}
    abar = dm.alphas_cumprod(
        settings.num_train_timesteps, settings.beta_start, settings.beta_end, settings.beta_schedule
    ).to(device)
    defect_samples, type_index = _defect_samples(defects)
    info: dict[str, Any] = {"good_images": len(good), "defects": counts}

    latent = None
    if pretrained is not None:
        from .pretrained import PretrainedLatent

        latent = PretrainedLatent.load(Path(pretrained), settings).to(device)
        settings = latent.settings
        image_model = _image_denoiser(settings, len(types_), latent.unet, latent.prefix).to(device)
        trainable: nn.Module = image_model.tokens
        image_items = _TypedItems(None, _cache(defect_samples, settings.image_size), type_index, 1)
        image_step = latent.loss
    else:
        unet = build_unet(settings, 3, settings.image_size, settings.block_channels)
        image_model = trainable = _image_denoiser(settings, len(types_), unet).to(device)
        goods = _cache([Sample(Path(p), 0, "good", None, "") for p in good], settings.image_size)
        repeats = defect_repeats(len(goods), len(defect_samples), settings.defect_share)
        image_items = _TypedItems(goods, _cache(defect_samples, settings.image_size), type_index, repeats)

        def image_step(batch: dict[str, Any], model: Denoiser) -> torch.Tensor:
            return image_loss(batch, model, abar, settings)

    log(f"training the image model on {len(good)} good images and {len(defect_samples)} defects ({', '.join(types_)})")
    image_log, image_steps = _train(
        "image",
        image_model,
        trainable,
        image_items,
        image_step,
        settings,
        settings.epochs,
        settings.time_budget,
        checkpoint_dir,
        resume,
        identity,
        device,
    )
    info["image"] = dataclasses.asdict(image_log) | {"steps": image_steps}

    log(f"training the mask model on the masks of {len(types_)} defect types")
    mask_unet = build_unet(settings, 1, settings.mask_size, settings.mask_block_channels)
    mask_model = _mask_denoiser(settings, len(types_), mask_unet).to(device)
    mask_items = _TypedItems(None, _cache(defect_samples, settings.mask_size), type_index, 1)
    mask_log, mask_steps = _train(
        "mask",
        mask_model,
        mask_model,
        mask_items,
        lambda batch, model: mask_loss(batch, model, abar, settings),
        settings,
        settings.mask_epochs,
        settings.mask_time_budget,
        checkpoint_dir,
        resume,
        identity,
        device,
    )
    info["mask"] = dataclasses.asdict(mask_log) | {"steps": mask_steps}
    info["seconds"] = round(time.monotonic() - started, 1)
    log(f"fitted the generator in {info['seconds']:.0f} s ({image_steps} image steps, {mask_steps} mask steps)")
    return DefectGenerator(
        settings,
        types_,
        image_model,
        mask_model,
        json.loads(json.dumps(info)),
        pretrained=pretrained,
        latent=latent,
        device=device,
    )
