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

Banks larger than memory: ``search_index="ivfpq"`` searches the bank through IVF-PQ codes (about
``D / 4`` bytes per patch in memory) and computes the candidates' exact distances from the bank's
vectors, which ``bank_on_disk=True`` memory-maps from the model file instead of reading it
(:mod:`defectscope.nn.compressed_index`; recall and memory at 1 M patches in BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch

from ..data import ImageDataset, iterate_batches
from ..data.dataset import ItemSource
from ..errors import DefectscopeError, NotExportable
from ..nn.compressed_index import IvfPqParts, train_ivfpq
from ..nn.coreset import greedy_coreset
from ..nn.embedding import patch_embedding
from ..nn.knn import BankSearch, NearestNeighbors
from ..postprocess import anomaly_maps
from ..thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from .backbone_detector import BackboneDetector
from .base import Prediction, fitted
from .params import base_params, check_at_least
from .sharded import Shards, shard_sources

#: How the bank is searched: ``auto`` (flat below 8192 patches, else an inverted file), ``exact`` (flat),
#: ``ivfpq`` (compressed codes, candidates re-ranked by exact distances).
SearchIndex = Literal["auto", "exact", "ivfpq"]
#: The model file's tensors of an IVF-PQ index, in :class:`IvfPqParts` order.
IVFPQ_TENSORS = ("ivfpq_centroids", "ivfpq_codebooks", "ivfpq_codes")


def patchcore_part(args: tuple[dict[str, Any], ItemSource, float]) -> tuple[int, torch.Tensor]:
    """On a worker: the number of patches of its images and their greedy coreset of ``share`` of them
    (the driver asks for as many as the whole training set's coreset will hold)."""
    params, source, share = args
    part = PatchCore(**params)
    patches = part._patches(source)
    return patches.shape[0], part._coreset(patches, max(1, round(patches.shape[0] * share)))


class PatchCore(BackboneDetector):
    """Memory-bank detector with coreset subsampling and nearest-neighbour scoring."""

    name = "patchcore"
    nonnegative_scores = True
    export_unsupported = None
    export_handover = "embeddings"
    #: ``fit --engine ray``: embeddings and a first coreset per worker, then the coreset of their union.
    distributed_fit: ClassVar[bool] = True
    param_help: ClassVar[dict[str, str]] = {
        "exact_search": "search the bank exactly (a flat index; the same as search_index=exact)",
        "search_index": "auto (flat, or an inverted file for large banks), exact, or ivfpq (compressed codes, "
        "re-ranked exactly: banks larger than memory)",
        "bank_on_disk": "with search_index=ivfpq: memory-map the bank from the model file instead of reading it",
    }

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
        search_index: SearchIndex = "auto",
        bank_on_disk: bool = False,
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
        self._shard_info: dict[str, Any] = {}
        self.exact_search = exact_search
        if bank_on_disk and search_index != "ivfpq":
            raise DefectscopeError(
                f"bank_on_disk=true needs search_index=ivfpq (the {search_index} index holds the whole bank in memory)"
            )
        if exact_search and search_index == "ivfpq":
            raise DefectscopeError("exact_search=true and search_index=ivfpq contradict each other: choose one")
        self.search_index: SearchIndex = search_index
        self.bank_on_disk = bank_on_disk
        self.num_neighbors = num_neighbors
        self.blur_sigma = blur_sigma
        self._index: NearestNeighbors | None = None
        #: Set by ``fit --engine ray``: a composable coreset over these workers (at most 4x the optimal radius).
        self.shards: Shards | None = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, D, h, w) of images (B, 3, H, W)."""
        return patch_embedding(self.features(images), self.neighbourhood, self.embed_dim)

    def _patches(self, source: ItemSource) -> torch.Tensor:
        """(N, D) patch embeddings of every image of ``source``."""
        chunks = []
        for batch in iterate_batches(source, self.batch_size, desc="extracting features"):
            emb = self.embed(batch["image"])
            chunks.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
        return torch.cat(chunks)

    def _coreset(self, bank: torch.Tensor, n_select: int) -> torch.Tensor:
        if n_select >= bank.shape[0]:
            return bank
        keep = greedy_coreset(bank, n_select, projection_dim=self.projection_dim, seed=self.seed, desc="coreset")
        return bank[keep]

    def _fit(self, dataset: ImageDataset) -> None:
        self._shard_info = {}
        if self.shards is not None:
            # composable coreset: each worker's greedy coreset of the global size, then greedy on their union
            parts = shard_sources(dataset, self.shards)
            share = min(1.0, self.coreset_ratio * len(parts))
            results = self.shards.map(patchcore_part, [(self.get_params(), part, share) for part in parts])
            n_patches = sum(n for n, _ in results)
            union = torch.cat([coreset for _, coreset in results])
            bank = self._coreset(union, max(1, round(n_patches * self.coreset_ratio)))
            self._shard_info = {"workers": len(parts), "patches": n_patches, "union": int(union.shape[0])}
        else:
            bank = self._patches(dataset)
            bank = self._coreset(bank, max(1, round(bank.shape[0] * self.coreset_ratio)))
        self._index = self._make_index(bank.contiguous(), None)

    def _make_index(self, bank: torch.Tensor, compressed: IvfPqParts | None) -> NearestNeighbors:
        if self.search_index == "ivfpq" and compressed is None:
            compressed = train_ivfpq(bank.float().numpy(), self.seed)
        return NearestNeighbors(bank, exact=self.exact_search or self.search_index == "exact", compressed=compressed)

    def _fit_details(self) -> dict[str, Any]:
        return super()._fit_details() | ({"distributed_coreset": self._shard_info} if self._shard_info else {})

    def _predict(self, images: torch.Tensor) -> Prediction:
        return self._predict_from_handover(self.embed(images))

    def _predict_from_handover(self, emb: torch.Tensor) -> Prediction:
        """Scores and maps from patch embeddings (B, D, h, w): faiss search, then :meth:`_scores_and_maps`."""
        d = emb.shape[1]
        queries = emb.permute(0, 2, 3, 1).reshape(-1, d)
        dist, nearest = self.index.search(queries, 1)
        scores, maps = self._scores_and_maps(
            queries, dist[:, 0], nearest[:, 0], emb.shape, self.index.bank, self._support
        )
        return Prediction(scores, maps)

    def _support(self, anchors: torch.Tensor) -> torch.Tensor:
        """(B, k) bank rows nearest to the bank rows ``anchors`` (B,), itself first, k = ``num_neighbors``."""
        return self.index.search(self.index.bank[anchors], min(self.num_neighbors, len(self.index))).indices

    def _scores_and_maps(
        self,
        queries: torch.Tensor,
        dist: torch.Tensor,
        nearest: torch.Tensor,
        shape: torch.Size,
        bank: torch.Tensor,
        support: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and maps from the patch queries (B*h*w, D), their nearest bank distances
        and rows (B*h*w,), the bank (N, D) and ``support``, the bank neighbourhood of a bank row (the paper's Eq. 7).

        The re-weighted image score is s = (1 - softmax(|m* - n|)_0) * max patch score: m* is an image's
        most anomalous patch and n ranges over the ``num_neighbors`` bank patches nearest to m*'s nearest
        bank patch (itself first), so a test patch whose nearest bank patch sits in a sparse region of the
        bank gets a score closer to its raw distance. Tensor operations only (it also builds the ONNX graph).
        """
        b, d, h, w = shape
        patch_scores = dist.reshape(b, h * w)
        best = patch_scores.argmax(1, keepdim=True)
        top = patch_scores.gather(1, best)[:, 0]
        maps = anomaly_maps(patch_scores.reshape(b, h, w), (self.image_size, self.image_size), self.blur_sigma)
        if min(self.num_neighbors, len(self.index)) < 2:
            return top, maps
        anchors = nearest.reshape(b, h * w).gather(1, best)[:, 0]
        worst = queries.reshape(b, h * w, d).gather(1, best[:, :, None].expand(b, 1, d))  # (B, 1, D)
        dists = torch.linalg.vector_norm(bank[support(anchors)] - worst, dim=-1)
        weight = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weight * top, maps

    @property
    def index(self) -> NearestNeighbors:
        return fitted(self, self._index)

    @property
    def memory_bank(self) -> torch.Tensor:
        """The coreset of good patch embeddings (M, D)."""
        return self.index.bank

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"memory_bank": self.memory_bank}
        if self.index.compressed is not None:
            state |= dict(zip(IVFPQ_TENSORS, self.index.compressed))
        return state

    def _mapped_tensors(self) -> set[str]:
        return {"memory_bank"} if self.bank_on_disk else set()

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        bank = tensors["memory_bank"]
        if bank.ndim != 2 or bank.dtype != torch.float32:
            raise ValueError(f"memory_bank must be 2-D float32, got {bank.dtype} {tuple(bank.shape)}")
        compressed = IvfPqParts(*(tensors[n] for n in IVFPQ_TENSORS)) if self.search_index == "ivfpq" else None
        self._index = self._make_index(bank, compressed)

    def export_module(self) -> torch.nn.Module:
        if self.search_index == "ivfpq":
            raise NotExportable(
                "patchcore cannot be exported to ONNX with search_index=ivfpq: its compressed index is searched by "
                "faiss only (fit with search_index=auto to export)"
            )
        return _PatchCoreGraph(self)


class _PatchCoreGraph(torch.nn.Module):
    """PatchCore's ``_predict`` with faiss replaced by :class:`BankSearch` and the bank neighbourhoods
    of Eq. 7 looked up in a table (every bank row's ``num_neighbors`` nearest rows, found by the same index)."""

    support: torch.Tensor  # buffer (N, k)

    def __init__(self, detector: PatchCore) -> None:
        super().__init__()
        self.detector = [detector]  # a list: not a submodule; its fitted tensors become graph constants
        self.extractor = detector.extractor
        self.search = BankSearch(detector.index)
        k = min(detector.num_neighbors, len(detector.index))
        rows = torch.arange(len(detector.index))
        table = torch.cat([detector._support(rows[a : a + 4096]) for a in range(0, len(rows), 4096)]) if k > 1 else rows
        self.register_buffer("support", table)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        detector = self.detector[0]
        emb = detector.embed(images)
        queries = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        dist, nearest = self.search(queries)
        scores, maps = detector._scores_and_maps(
            queries, dist, nearest, emb.shape, self.search.bank, lambda rows: self.support[rows]
        )
        return scores, maps, emb
