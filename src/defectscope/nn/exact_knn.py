"""Exact k-nearest-neighbour search in plain tensor operations (matrix products and top-k).

The neighbours an exact faiss index finds (:class:`~defectscope.nn.knn.NearestNeighbors` with a flat
index), found as faiss finds them for batches (squared distances as ``|q|^2 - 2 q.g + |g|^2``) and
traceable into an ONNX graph; the distances returned are then recomputed from the differences
(:func:`exact_distances`), so that torch and an ONNX runtime agree on them. Galleries are searched in
chunks whose partial top-k are merged, so the distance matrix of a large gallery never exists at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .knn import Neighbours

#: Gallery rows compared with the queries at once.
CHUNK = 4096


def partial_knn(queries: torch.Tensor, gallery: torch.Tensor, k: int, offset: int = 0) -> Neighbours:
    """The k smallest ``|g|^2 - 2 q.g`` (B, Q, k) of queries (B, Q, D) over one gallery chunk (B, N, D),
    with their rows numbered from ``offset``; ``|q|^2`` is added by :func:`merge` (it does not move the order)."""
    norms = (gallery * gallery).sum(2)[:, None, :]
    d = torch.baddbmm(norms, queries, gallery.transpose(1, 2), alpha=-2.0)
    values, rows = torch.topk(d, min(k, gallery.shape[1]), dim=2, largest=False)
    return Neighbours(values, rows + offset)


def merge(queries: torch.Tensor, parts: Iterable[Neighbours], k: int) -> Neighbours:
    """The k nearest of the partial answers of :func:`partial_knn`: Euclidean distances and rows (B, Q, k)."""
    parts = list(parts)
    values, rows = parts[0]
    if len(parts) > 1:
        values, pick = torch.topk(torch.cat([p.distances for p in parts], 2), k, dim=2, largest=False)
        rows = torch.cat([p.indices for p in parts], 2).gather(2, pick)
    q_norms = (queries * queries).sum(2, keepdim=True)
    return Neighbours((values + q_norms).clamp_min(0.0).sqrt(), rows)


def exact_distances(queries: torch.Tensor, vectors: torch.Tensor, rows: torch.Tensor) -> Neighbours:
    """The distances of queries (..., D) to the vectors found for them (..., k, D), from the differences, and
    the rows (..., k) of those vectors, nearest first.

    The matrix-product form of the search loses digits when a distance is small next to the vectors'
    norms, and the way it loses them depends on the matrix-product kernel, which differs between torch
    and an ONNX runtime; the differences do not. Near-ties may change places, so they are sorted again.
    """
    dist, order = torch.linalg.vector_norm(vectors - queries[..., None, :], dim=-1).sort(-1)
    return Neighbours(dist, rows.gather(-1, order))


def knn(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = CHUNK) -> Neighbours:
    """Distances and rows (Q, k) of the k nearest rows of ``bank`` (N, D) to queries (Q, D), nearest first."""
    k = min(k, bank.shape[0])
    q = queries[None]
    parts = [partial_knn(q, bank[None, a : a + chunk], k, a) for a in range(0, bank.shape[0], chunk)]
    rows = merge(q, parts, k).indices[0]
    return exact_distances(queries, bank[rows], rows)
