"""Multiresolution knowledge distillation, MKD (Salehi et al., "Multiresolution Knowledge Distillation
for Anomaly Detection", CVPR 2021).

A frozen pretrained source network and a smaller, randomly initialised cloner see the same image;
on good images the cloner learns to reproduce the source's activations at several intermediate
("critical") layers, with the paper's loss per image

    L = sum_i [ mean_j (a_s^i(j) - a_c^i(j))^2 ]  +  lambda * sum_i [ 1 - cos(vec(a_s^i), vec(a_c^i)) ]

(L_val, Euclidean, plus L_dir, the cosine of whole flattened layers). The image's anomaly score is
that loss at test time. The cloner has no bias terms and no batch norm, as in the paper: with a
bias it could output near-constant activations that fit very similar good images regardless of
the input. The paper sets lambda so that both terms have the same scale on the untrained network;
``lambda_dir=None`` (the default) does exactly that, measured on the first training batch, and is
stored with the model (public implementations use a fixed 0.01, which suits the scale of VGG
activations, not of these features: EfficientNet-Lite0 features have a standard deviation near 9,
so the balanced weight comes out near 75 on MVTec bottle). Source: by default the stride-4, 8 and
16 features of EfficientNet-Lite0 (the paper: four max-pooling outputs of VGG-16); the cloner
mirrors those strides with fewer channels (``width`` at stride 8) and ends every critical layer
with a bias-free 1x1 projection to the source's channel count.

Localisation (``localization``):

- ``"gradient"`` (the paper): the gradient of the image's loss with respect to the input pixels
  (absolute value, summed over colour channels), Gaussian-smoothed and cleaned by a grey-scale
  morphological opening with a ``opening_size`` square, which removes isolated noisy peaks.
- ``"discrepancy"`` (default): the per-position version of the same loss, squared error plus
  lambda times (1 - cosine) between source and cloner features, summed over layers at the finest
  layer's resolution, upsampled and smoothed. It needs no backward pass at test time and
  localises clearly better on MVTec bottle (128 px; pixel AUROC 0.963 against 0.893 for gradient
  maps after 30 epochs, 0.976 against 0.915 after 60 epochs; gradient maps with sigma 4 or 8 and
  openings of 5 or 9 pixels score alike; AUPRO 0.89 against 0.58 after 30 epochs).

Source features of the training images are computed once (the source is frozen and the paper
uses no augmentation). Defaults (128 px, 40 epochs, Adam lr 1e-3 as in the paper, cosine decay)
train on the 209 MVTec bottle images in about two CPU-minutes (image AUROC 0.99).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset
from ..errors import DefectscopeError
from ..nn.distillation import (
    TeacherTargets,
    batch_targets,
    conv_block,
    cosine_distance,
    discrepancy_map,
    squared_distance,
    stride_index,
)
from ..postprocess import anomaly_maps
from ..training import CachedImages, cosine_schedule, shuffled_batches
from .backbone_detector import BackboneDetector
from .base import fitted
from .trained import TrainedDetector

LOCALIZATIONS = ("gradient", "discrepancy")


class Cloner(nn.Module):
    """Bias-free VGG-like CNN (conv + ReLU) with a bias-free 1x1 projection at every critical stride."""

    def __init__(self, channels: Sequence[int], levels: Sequence[int], width: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleDict()
        c_in = 3
        for level in range(1, max(levels) + 1):
            w = max(int(width * 2.0 ** (level - 3)), 8)
            stage = [conv_block(c_in, w, stride=2, batch_norm=False)]
            if level > 1:
                stage.append(conv_block(w, w, batch_norm=False))
            self.stages.append(nn.Sequential(*stage))
            if level in levels:
                self.heads[str(level)] = nn.Conv2d(w, channels[levels.index(level)], 1, bias=False)
            c_in = w
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for level, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if str(level) in self.heads:
                outputs.append(self.heads[str(level)](x))
        return outputs


def value_loss(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_val per image: sum over layers of the mean squared activation difference, (B,)."""
    return sum(squared_distance(o, t).flatten(1).mean(1) for o, t in zip(outputs, targets))


def direction_loss(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_dir per image: sum over layers of 1 - cosine of the flattened activations, (B,)."""
    return sum(1.0 - F.cosine_similarity(o.flatten(1), t.flatten(1), dim=1, eps=1e-8) for o, t in zip(outputs, targets))


def grey_opening(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Grey-scale morphological opening (erosion then dilation) of (B, H, W) maps with a size x size square."""
    if size <= 1:
        return maps
    pad = size // 2
    x = maps[:, None]
    eroded = -F.max_pool2d(F.pad(-x, (pad, pad, pad, pad), mode="replicate"), size, stride=1)
    opened = F.max_pool2d(F.pad(eroded, (pad, pad, pad, pad), mode="replicate"), size, stride=1)
    return opened[:, 0, : maps.shape[-2], : maps.shape[-1]]


class MKD(TrainedDetector, BackboneDetector):
    """Source/cloner distillation at several layers; score = distillation loss, maps by gradient or discrepancy."""

    name = "mkd"

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: tuple[str, ...] = ("s4", "s8", "s16"),
        weights: str | None = None,
        image_size: int = 128,
        width: int = 64,
        lambda_dir: float | None = None,
        localization: str = "discrepancy",
        blur_sigma: float = 4.0,
        opening_size: int = 5,
        epochs: int = 40,
        lr: float = 1e-3,
        time_budget: float | None = None,
        batch_size: int = 16,
        calibration_fraction: float = 0.1,
        threshold_sigmas: float = 3.0,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone=backbone, layers=layers, weights=weights, epochs=epochs, lr=lr,
                         time_budget=time_budget, image_size=image_size, batch_size=batch_size,
                         calibration_fraction=calibration_fraction, threshold_sigmas=threshold_sigmas, seed=seed)
        levels = [stride_index(layer) for layer in self.layers]
        if levels != sorted(set(levels)):
            raise DefectscopeError(f"layers must be distinct strides, finest first, e.g. s4,s8,s16; got {list(layers)}")
        if localization not in LOCALIZATIONS:
            raise DefectscopeError(f"localization must be one of {', '.join(LOCALIZATIONS)}, got {localization!r}")
        if lambda_dir is not None and lambda_dir < 0:
            raise DefectscopeError(f"lambda_dir must be non-negative or None (balanced), got {lambda_dir}")
        self.width = width
        self.lambda_dir = lambda_dir
        self.localization = localization
        self.blur_sigma = blur_sigma
        self.opening_size = opening_size
        self._cloner: Cloner | None = None
        self._lambda: float | None = None  # the weight in use (lambda_dir, or the balanced one)

    def _build(self) -> Cloner:
        levels = [stride_index(layer) for layer in self.layers]
        return Cloner(self.extractor.channels, levels, self.width).to(self.device)

    @property
    def cloner(self) -> Cloner:
        return fitted(self, self._cloner)

    @property
    def lambda_used(self) -> float:
        """The L_dir weight of the fitted model (``lambda_dir``, or the one balanced at the start of training)."""
        return fitted(self, self._lambda)

    def losses(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """The total MKD loss per image, (B,)."""
        return value_loss(outputs, targets) + self.lambda_used * direction_loss(outputs, targets)

    def _fit(self, dataset: ImageDataset) -> None:
        data = TeacherTargets.compute(CachedImages(dataset), self.features, self.batch_size)
        n = len(self.layers)
        torch.manual_seed(self.seed)
        self._cloner = cloner = self._build()
        if self.lambda_dir is None:
            first = next(iter(shuffled_batches(data, self.batch_size, seed=self.seed, epoch=0)))
            with torch.no_grad():
                targets = batch_targets(first, n, self.device)
                outputs = cloner(first["image"].to(self.device))
                self._lambda = float(value_loss(outputs, targets).mean() / direction_loss(outputs, targets).mean())
        else:
            self._lambda = float(self.lambda_dir)
        optimizer = torch.optim.Adam(cloner.parameters(), lr=self.lr)

        def step(batch: dict) -> dict[str, torch.Tensor]:
            targets = batch_targets(batch, n, self.device)
            outputs = cloner(batch["image"].to(self.device))
            val, direction = value_loss(outputs, targets).mean(), direction_loss(outputs, targets).mean()
            return {"loss": val + self.lambda_used * direction, "val": val, "dir": direction}

        self.train({"cloner": cloner}, optimizer,
                   lambda epoch: shuffled_batches(data, self.batch_size, seed=self.seed, epoch=epoch), step,
                   lr_schedule=cosine_schedule(self.epochs))

    def _predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = tuple(images.shape[-2:])
        if self.localization == "gradient":
            with torch.enable_grad():
                x = images.detach().clone().requires_grad_(True)
                loss = self.losses(self.cloner(x), self.extractor(x))
                (grad,) = torch.autograd.grad(loss.sum(), x)
            maps = grey_opening(anomaly_maps(grad.abs().sum(1), size, self.blur_sigma), self.opening_size)
            return loss.detach(), maps
        targets = [f.float() for f in self.extractor(images)]
        outputs = self.cloner(images)
        lam = self.lambda_used

        def local(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return squared_distance(o, t) + lam * cosine_distance(o, t)

        raw = discrepancy_map(outputs, targets, tuple(targets[0].shape[-2:]), local)
        return self.losses(outputs, targets), anomaly_maps(raw, size, self.blur_sigma)

    def _to_device(self, device: torch.device) -> None:
        super()._to_device(device)
        if self._cloner is not None:
            self._cloner.to(device)

    def _fit_details(self) -> dict:
        return {**super()._fit_details(), "lambda_dir": self._lambda}

    def _state(self) -> dict[str, torch.Tensor]:
        tensors = {f"cloner.{k}": v for k, v in self.cloner.state_dict().items()}
        tensors["lambda_dir"] = torch.tensor(self.lambda_used, dtype=torch.float64)
        return tensors

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        cloner = self._build()
        cloner.load_state_dict({k.removeprefix("cloner."): v for k, v in tensors.items() if k.startswith("cloner.")})
        self._cloner = cloner.eval()
        self._lambda = float(tensors["lambda_dir"])
