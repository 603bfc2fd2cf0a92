"""A compressed search index for memory banks larger than memory: faiss IVF-PQ, re-ranked exactly.

The bank's vectors are assigned to k-means cells (the inverted file) and each vector's residual to
its cell centre is stored as ``m`` bytes of product-quantisation codes (``m`` sub-vectors of
``D / m`` dimensions, 256 centres each). A query searches its ``nprobe`` nearest cells with the
codes, which gives ``rerank`` candidates; their exact distances are then computed from the bank's
own vectors, which may be a memory-mapped file (only the candidates' rows are read). Memory per
vector is ``m`` bytes of codes plus an 8-byte id, instead of ``4 D`` bytes.

The index is kept as three plain tensors (:class:`IvfPqParts`: cell centres, PQ codebooks and each
vector's code), so that a model file holds data only; :func:`ivfpq_index` rebuilds the faiss index
from them after checking their shapes and cell numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import faiss
import numpy as np
import torch

#: Candidates per query whose exact distances are computed.
RERANK = 32
#: Cells searched per query.
NPROBE = 16
#: Vectors the cell centres and codebooks are trained on (a seeded sample of the bank), at least 64 per cell.
TRAIN_SAMPLE = 262_144


class IvfPqParts(NamedTuple):
    """An IVF-PQ index as tensors: cell centres (C, D), codebooks (m, 256, D/m), codes (N, code bytes)."""

    centroids: torch.Tensor
    codebooks: torch.Tensor
    codes: torch.Tensor


def n_cells(n: int) -> int:
    """Inverted-file cells for a bank of n vectors: the power of two nearest to 2 sqrt(n), 16 to 65536
    (so the codes a query scans grow as sqrt(n))."""
    return int(min(65536, max(16, 2 ** round(math.log2(2 * math.sqrt(n))))))


def n_subquantizers(dim: int) -> int:
    """PQ sub-vectors: the largest divisor of ``dim`` of at most dim / 4 (4 dimensions per code byte)."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def _empty_index(dim: int, cells: int, m: int) -> faiss.IndexIVFPQ:
    quantizer = faiss.IndexFlatL2(dim)
    return faiss.IndexIVFPQ(quantizer, dim, cells, m, 8)  # the wrapper keeps the quantizer alive


def train_ivfpq(bank: np.ndarray, seed: int = 0) -> IvfPqParts:
    """Train cell centres and codebooks on a seeded sample of ``bank`` (N, D) float32, then encode all of it."""
    n, dim = bank.shape
    cells, m = n_cells(n), n_subquantizers(dim)
    index = _empty_index(dim, cells, m)
    for clustering in (index.cp, index.pq.cp):
        clustering.seed = seed
        clustering.min_points_per_centroid = 1  # small banks train on what they have, without warnings
    rng = np.random.default_rng(seed)
    size = max(TRAIN_SAMPLE, 64 * cells)
    sample = bank if n <= size else bank[np.sort(rng.choice(n, size, replace=False))]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    codes = np.concatenate(
        [index.sa_encode(np.ascontiguousarray(bank[a : a + 65536], dtype=np.float32)) for a in range(0, n, 65536)]
    )
    assert index.quantizer is not None
    centroids = index.quantizer.reconstruct_n(0, cells)
    codebooks = faiss.vector_to_array(index.pq.centroids).reshape(m, index.pq.ksub, index.pq.dsub)
    return IvfPqParts(torch.from_numpy(centroids), torch.from_numpy(codebooks), torch.from_numpy(codes))


def list_bytes(cells: int) -> int:
    """Bytes of the cell number at the start of each code (faiss's standalone code layout)."""
    return max(1, math.ceil(math.log2(cells) / 8)) if cells > 1 else 0


def ivfpq_index(parts: IvfPqParts, n: int, dim: int, nprobe: int = NPROBE) -> faiss.IndexIVFPQ:
    """The faiss index the parts stand for, holding the codes of the n bank vectors; ValueError when they do not fit."""
    centroids, codebooks, codes = parts
    if centroids.ndim != 2 or centroids.shape[1] != dim or not 1 <= centroids.shape[0] <= 65536:
        raise ValueError(f"ivfpq_centroids must be (cells, {dim}), got {tuple(centroids.shape)}")
    cells = centroids.shape[0]
    if codebooks.ndim != 3 or codebooks.shape[1] != 256 or codebooks.shape[0] * codebooks.shape[2] != dim:
        raise ValueError(f"ivfpq_codebooks must be (m, 256, {dim} / m), got {tuple(codebooks.shape)}")
    m = codebooks.shape[0]
    head = list_bytes(cells)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (n, head + m):
        raise ValueError(f"ivfpq_codes must be uint8 ({n}, {head + m}), got {codes.dtype} {tuple(codes.shape)}")
    raw = codes.numpy()
    cell_of = np.zeros(n, dtype=np.int64)
    for byte in range(head):  # little-endian cell numbers
        cell_of |= raw[:, byte].astype(np.int64) << (8 * byte)
    if n and int(cell_of.max()) >= cells:
        raise ValueError(f"ivfpq_codes name cell {int(cell_of.max())} of an index of {cells} cells")
    index = _empty_index(dim, cells, m)
    assert index.quantizer is not None
    index.quantizer.add(np.ascontiguousarray(centroids.float().numpy()))
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks.float().numpy()).ravel(), index.pq.centroids)
    index.pq.sync_transposed_centroids()
    index.precompute_table()
    index.is_trained = True
    index.add_sa_codes(np.ascontiguousarray(raw))
    index.nprobe = min(nprobe, cells)
    return index


def reranked(
    index: faiss.Index, bank: torch.Tensor, queries: np.ndarray, k: int, rerank: int = RERANK, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances and rows (Q, k) of the k nearest of the ``max(k, rerank)`` candidates the codes
    find for each query, by exact distances to the bank's rows (a candidate the index could not fill is inf).
    Queries are re-ranked ``chunk`` at a time, so the candidates' vectors in memory stay a few megabytes."""
    _, rows = index.search(queries, max(k, rerank))
    found = torch.from_numpy(rows)
    best, where = [], []
    for a in range(0, len(found), chunk):
        part = found[a : a + chunk]
        safe = part.clamp_min(0)
        vectors = bank[safe.reshape(-1)].reshape(*safe.shape, bank.shape[1])
        dist = torch.linalg.vector_norm(vectors - torch.from_numpy(queries[a : a + chunk])[:, None, :], dim=2)
        dist = torch.where(part >= 0, dist, torch.full_like(dist, float("inf")))
        value, order = dist.topk(k, dim=1, largest=False)
        best.append(value)
        where.append(safe.gather(1, order))
    if not best:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(best), torch.cat(where)
