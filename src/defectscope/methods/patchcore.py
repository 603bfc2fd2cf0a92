"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features from two mid-level backbone layers form a memory bank of good
patches, subsampled by a greedy k-center coreset (computed on a ``projection_dim`` random
projection, as the paper's approximate greedy coreset). A test patch scores its distance to the
nearest bank patch (faiss; an inverted-file index for large banks unless ``exact_search``); the
image score is the largest patch score, re-weighted by how isolated that bank patch is among its
own neighbours (the paper's Eq. 7). By default the layers' channels are concatenated as they
are; ``embed_dim`` instead pools every layer (adaptive average over channels) to an equal share
of a fixed dimension, the paper's fixed-dimension projection, which weighs the finer layer more
(see BENCHMARKS.md for when that helps).
"""

from __future__ import annotations

import torch

from ..data import ImageDataset, iterate_batches
from ..errors import DefectscopeError
from ..nn.coreset import greedy_coreset
from ..nn.embedding import patch_embedding
from ..nn.knn import NearestNeighbors
from ..postprocess import anomaly_maps
from ..thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from .backbone_detector import BackboneDetector
from .base import Prediction, fitted
from .params import base_params, check_at_least


class PatchCore(BackboneDetector):
    """Memory-bank detector with coreset subsampling and nearest-neighbour scoring."""

    name = "patchcore"
    nonnegative_scores = True

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: tuple[str, ...] = ("s8", "s16"),
        weights: str | None = None,
        image_size: int = 256,
        embed_dim: int | None = None,
        neighbourhood: int = 3,
        coreset_ratio: float = 0.1,
        projection_dim: int = 64,
        exact_search: bool = False,
        num_neighbors: int = 9,
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
        super().__init__(**base_params(PatchCore, locals()))
        if not 0.0 < coreset_ratio <= 1.0:
            raise DefectscopeError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        check_at_least(1, embed_dim=embed_dim, projection_dim=projection_dim, num_neighbors=num_neighbors)
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise DefectscopeError(f"neighbourhood must be an odd number of at least 1, got {neighbourhood}")
        self.embed_dim = embed_dim
        self.neighbourhood = neighbourhood
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.exact_search = exact_search
        self.num_neighbors = num_neighbors
        self.blur_sigma = blur_sigma
        self._index: NearestNeighbors | None = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, D, h, w) of images (B, 3, H, W)."""
        return patch_embedding(self.features(images), self.neighbourhood, self.embed_dim)

    def _fit(self, dataset: ImageDataset) -> None:
        chunks = []
        for batch in iterate_batches(dataset, self.batch_size, desc="extracting features"):
            emb = self.embed(batch["image"])
            chunks.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
        bank = torch.cat(chunks)
        del chunks
        n_select = max(1, round(bank.shape[0] * self.coreset_ratio))
        if n_select < bank.shape[0]:
            keep = greedy_coreset(bank, n_select, projection_dim=self.projection_dim, seed=self.seed, desc="coreset")
            bank = bank[keep]
        self._index = NearestNeighbors(bank.contiguous(), exact=self.exact_search)

    def _predict(self, images: torch.Tensor) -> Prediction:
        emb = self.embed(images)
        b, d, h, w = emb.shape
        queries = emb.permute(0, 2, 3, 1).reshape(-1, d)
        dist, nearest = self.index.search(queries, 1)
        patch_scores = dist[:, 0].reshape(b, h * w)
        scores = self._image_scores(queries.reshape(b, h * w, d), patch_scores, nearest[:, 0].reshape(b, h * w))
        return Prediction(scores, anomaly_maps(patch_scores.reshape(b, h, w), images.shape[-2:], self.blur_sigma))

    def _image_scores(self, queries: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """The paper's re-weighted image score: s = (1 - softmax(|m* - n|)_0) * max patch score.

        For each image, m* is its most anomalous patch and n ranges over the ``num_neighbors``
        bank patches nearest to m*'s nearest bank patch (itself first). A test patch whose nearest
        bank patch sits in a sparse region of the bank gets a score closer to its raw distance.
        """
        best = patch_scores.argmax(1)
        rows = torch.arange(patch_scores.shape[0])
        top = patch_scores[rows, best]
        k = min(self.num_neighbors, len(self.index))
        if k < 2:
            return top
        anchors = self.index.bank[nearest[rows, best]]
        _, support = self.index.search(anchors, k)
        worst = queries[rows, best]
        dists = torch.linalg.vector_norm(self.index.bank[support] - worst[:, None], dim=-1)
        weight = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weight * top

    @property
    def index(self) -> NearestNeighbors:
        return fitted(self, self._index)

    @property
    def memory_bank(self) -> torch.Tensor:
        """The coreset of good patch embeddings (M, D)."""
        return self.index.bank

    def _state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank}

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        bank = tensors["memory_bank"]
        if bank.ndim != 2:
            raise ValueError(f"memory_bank must be 2-D, got shape {tuple(bank.shape)}")
        self._index = NearestNeighbors(bank, exact=self.exact_search)
