"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization", ICPR 2020).

Every position of the finest feature grid gets its own multivariate Gaussian over the
concatenated multi-layer features. ``n_channels`` (default 160) caps the feature size: the
small default backbones keep all their channels (128 and 152), larger ones use a seeded random
subset of that size, as the paper does, so the model stays small. A test
position scores its Mahalanobis distance to the Gaussian of its position; the image score is the
maximum of the anomaly map.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..data import ImageDataset, iterate_batches
from ..data.dataset import ItemSource
from ..errors import DefectscopeError
from ..nn.embedding import patch_embedding
from ..nn.gaussian import StreamingGaussian, mahalanobis
from ..postprocess import anomaly_maps
from ..thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from .backbone_detector import BackboneDetector
from .base import Prediction, fitted
from .params import base_params
from .sharded import Shards, shard_sources


def padim_part(args: tuple[dict[str, Any], ItemSource]) -> dict[str, torch.Tensor]:
    """On a worker: a PaDiM of these parameters accumulates the embeddings of its part of the images."""
    params, source = args
    part = PaDiM(**params)
    gaussian = part._accumulate(source)
    return gaussian.state() | {"channels": part.channels}


class PaDiM(BackboneDetector):
    """Per-position Gaussian detector with Mahalanobis scoring."""

    name = "padim"
    nonnegative_scores = True
    export_unsupported = None
    #: ``fit --engine ray`` fits this class on several workers (read from the class itself, so a subclass
    #: that fits differently does not inherit it).
    distributed_fit: ClassVar[bool] = True

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: tuple[str, ...] = ("s8", "s16"),
        weights: str | None = None,
        image_size: int = 256,
        n_channels: int | None = 160,
        neighbourhood: int = 1,
        eps: float = 0.01,
        blur_sigma: float = 4.0,
        batch_size: int = 16,
        calibration_fraction: float = 0.1,
        threshold_rule: ThresholdRule = DEFAULT_RULE,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        false_alarm_confidence: float | None = None,
        target_recall: float = DEFAULT_TARGET_RECALL,
        threshold_sigmas: float = 3.0,
        seed: int = 0,
    ) -> None:
        super().__init__(**base_params(PaDiM, locals()))
        if n_channels is not None and n_channels < 1:
            raise DefectscopeError(f"n_channels must be at least 1 (or None for all), got {n_channels}")
        if eps <= 0:
            raise DefectscopeError(f"eps must be positive, got {eps}")
        self.n_channels = n_channels
        #: Set by ``fit --engine ray``: the embeddings are accumulated on these workers and merged exactly.
        self.shards: Shards | None = None
        self.neighbourhood = neighbourhood
        self.eps = eps
        self.blur_sigma = blur_sigma
        self._channels: torch.Tensor | None = None  # (d,) indices into the concatenated features
        self._mean: torch.Tensor | None = None  # (P, d)
        self._whitener: torch.Tensor | None = None  # (P, d, d), inverse Cholesky factor of the covariance

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, d, h, w) of the selected channels, at the finest layer's grid."""
        emb = patch_embedding(self.features(images), self.neighbourhood)
        return emb if self._channels is None else emb[:, self._channels]

    def _select_channels(self, total: int) -> torch.Tensor:
        """Sorted, seeded random subset of ``n_channels`` of ``total`` channels (all when None or larger)."""
        if self.n_channels is None or self.n_channels >= total:
            return torch.arange(total)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(total, generator=generator)[: self.n_channels].sort().values

    def _accumulate(self, source: ItemSource) -> StreamingGaussian:
        """The embeddings of ``source``'s images, accumulated (sets the channel subset)."""
        self._channels = None
        gaussian = StreamingGaussian()
        for batch in iterate_batches(source, self.batch_size, desc="fitting Gaussians"):
            emb = self.embed(batch["image"])
            if self._channels is None:
                self._channels = self._select_channels(emb.shape[1])
                emb = emb[:, self._channels]
            gaussian.update(emb.flatten(2).transpose(1, 2))
        return gaussian

    def _fit(self, dataset: ImageDataset) -> None:
        if self.shards is not None:
            # one part per worker, each accumulated where it runs, merged exactly here
            parts = shard_sources(dataset, self.shards)
            states = self.shards.map(padim_part, [(self.get_params(), part) for part in parts])
            gaussian = StreamingGaussian.merged(states)
            self._channels = states[0]["channels"]
        else:
            gaussian = self._accumulate(dataset)
        if gaussian.count < 2:
            raise DefectscopeError(f"PaDiM needs at least 2 fitting images, got {gaussian.count}")
        self._mean = gaussian.mean().float()
        self._whitener = gaussian.whitener(self.eps)

    def _predict(self, images: torch.Tensor) -> Prediction:
        emb = self.embed(images)
        b, _, h, w = emb.shape
        dist = mahalanobis(emb.flatten(2).transpose(1, 2), self.mean, self.whitener)
        maps = anomaly_maps(dist.reshape(b, h, w), images.shape[-2:], self.blur_sigma)
        return Prediction(maps.flatten(1).amax(1), maps)

    @property
    def channels(self) -> torch.Tensor:
        """(d,) indices of the embedding channels the Gaussians model."""
        return fitted(self, self._channels)

    @property
    def mean(self) -> torch.Tensor:
        """(P, d) per-position feature means."""
        return fitted(self, self._mean)

    @property
    def whitener(self) -> torch.Tensor:
        """(P, d, d) inverse Cholesky factors of the regularised per-position covariances."""
        return fitted(self, self._whitener)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"channels": self.channels, "mean": self.mean, "whitener": self.whitener}

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        channels, mean, whitener = tensors["channels"], tensors["mean"], tensors["whitener"]
        p, d = mean.shape
        if channels.shape != (d,) or whitener.shape != (p, d, d):
            raise ValueError(
                f"inconsistent shapes: channels {tuple(channels.shape)}, mean {tuple(mean.shape)}, "
                f"whitener {tuple(whitener.shape)}"
            )
        self._channels, self._mean, self._whitener = channels.long(), mean.float(), whitener.float()
