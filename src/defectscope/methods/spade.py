"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", 2020).

A test image first finds its K nearest good training images by their globally pooled deepest
features; its score is the mean distance to them. Each test position is then compared with every
position of those K images only (multi-layer features, kappa nearest patches), which aligns the
test image with similar good images without a global memory bank.
"""

from __future__ import annotations

import torch

from ..backbones import LAYERS
from ..data import ImageDataset, iterate_batches
from ..errors import DefectscopeError
from ..nn.embedding import patch_embedding
from ..nn.exact_knn import CHUNK, exact_distances, knn, merge, partial_knn
from ..nn.knn import NearestNeighbors
from ..postprocess import anomaly_maps
from ..thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from .backbone_detector import BackboneDetector
from .base import Prediction, fitted
from .params import base_params, check_choice


class SPADE(BackboneDetector):
    """Image-level kNN retrieval followed by pixel-level kNN against the retrieved images."""

    name = "spade"
    nonnegative_scores = True
    export_unsupported = None

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: tuple[str, ...] = ("s8", "s16"),
        image_layer: str = "s32",
        weights: str | None = None,
        image_size: int = 256,
        num_image_neighbors: int = 50,
        num_patch_neighbors: int = 1,
        neighbourhood: int = 1,
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
        super().__init__(**base_params(SPADE, locals()))
        check_choice("image_layer", image_layer, LAYERS)
        if num_image_neighbors < 1 or num_patch_neighbors < 1:
            raise DefectscopeError(
                "num_image_neighbors and num_patch_neighbors must be at least 1, "
                f"got {num_image_neighbors} and {num_patch_neighbors}"
            )
        self.image_layer = image_layer
        self.num_image_neighbors = num_image_neighbors
        self.num_patch_neighbors = num_patch_neighbors
        self.neighbourhood = neighbourhood
        self.blur_sigma = blur_sigma
        self._image_index: NearestNeighbors | None = None  # its bank: pooled features of the N fitting images
        self._patches: torch.Tensor | None = None  # (N, P, D) float16 patch features of the same images

    @property
    def extracted_layers(self) -> tuple[str, ...]:
        """The patch layers, then the layer pooled for the image-level search."""
        return (*self.layers, self.image_layer)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled image features (B, C) and patch features (B, D, h, w) of images (B, 3, H, W)."""
        *pixel_layers, deepest = self.features(images)
        return deepest.mean((2, 3)), patch_embedding(pixel_layers, self.neighbourhood)

    def _fit(self, dataset: ImageDataset) -> None:
        pooled, patches, start = [], None, 0
        for batch in iterate_batches(dataset, self.batch_size, desc="extracting features"):
            glob, emb = self.embed(batch["image"])
            emb = emb.flatten(2).transpose(1, 2)  # (B, P, D)
            if patches is None:
                patches = torch.empty((len(dataset), *emb.shape[1:]), dtype=torch.float16)
            patches[start : start + emb.shape[0]] = emb
            start += emb.shape[0]
            pooled.append(glob)
        pooled_all = torch.cat(pooled)
        assert patches is not None  # torch.cat refuses an empty list: some batch was seen
        self._set_bank(pooled_all, patches)

    def _set_bank(self, pooled: torch.Tensor, patches: torch.Tensor) -> None:
        self._image_index = NearestNeighbors(pooled, exact=True)
        self._patches = patches.to(torch.float16)

    def nearest_images(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances and indices (B, K) of the K nearest fitting images of pooled features (B, C)."""
        return knn(pooled, self.image_index.bank, self.num_image_neighbors)

    def patch_distances(self, queries: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """(B, P, k) distances of patch features (B, P, D) to their k nearest patches among all patches of
        each image's retrieved fitting images ``nearest`` (B, K), gathered a few images at a time."""
        patches = self.patches
        per_image = patches.shape[1]
        k = min(self.num_patch_neighbors, nearest.shape[1] * per_image)
        step = max(1, CHUNK // per_image)
        parts = [
            partial_knn(queries, patches[nearest[:, a : a + step]].flatten(1, 2).float(), k, a * per_image)
            for a in range(0, nearest.shape[1], step)
        ]
        found = merge(queries, parts, k).indices  # (B, P, k) rows of the gallery: image rank * P + patch
        image = nearest.gather(1, (found // per_image).flatten(1)).view_as(found)
        vectors = patches[image, found % per_image].float()
        return exact_distances(queries, vectors, found).distances

    def _predict(self, images: torch.Tensor) -> Prediction:
        pooled, emb = self.embed(images)
        b, _, h, w = emb.shape
        dist, nearest = self.nearest_images(pooled)
        patch_scores = self.patch_distances(emb.flatten(2).transpose(1, 2), nearest).mean(2)
        return Prediction(dist.mean(1), anomaly_maps(patch_scores.reshape(b, h, w), images.shape[-2:], self.blur_sigma))

    @property
    def image_index(self) -> NearestNeighbors:
        return fitted(self, self._image_index)

    @property
    def patches(self) -> torch.Tensor:
        """(N, P, D) float16 patch features of the fitting images."""
        return fitted(self, self._patches)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"image_features": self.image_index.bank, "patch_features": self.patches}

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pooled, patches = tensors["image_features"], tensors["patch_features"]
        if pooled.ndim != 2 or patches.ndim != 3 or pooled.shape[0] != patches.shape[0]:
            raise ValueError(
                f"image_features {tuple(pooled.shape)} and patch_features {tuple(patches.shape)} "
                "must be (N, C) and (N, P, D)"
            )
        self._set_bank(pooled, patches)
