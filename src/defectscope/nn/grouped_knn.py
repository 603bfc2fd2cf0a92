"""Exact nearest neighbours that leave out bank entries of the query's own groups (leave-one-out).

A training patch taken from an image whose patches are also in a memory bank finds itself (or
its overlapping neighbours) at distance ~0, which no test patch ever does. Tagging every bank
entry and every query with the image (or defect) it comes from, and skipping the bank entries
that share a tag with the query, gives training queries the same view of the bank that unseen
test images get. Brute force in row chunks (one matrix product each), so the result is exact.
"""

from __future__ import annotations

import torch

from .knn import Neighbours

_CHUNK = 2048  # queries per matrix product: bounds the temporary distance matrix to chunk x bank


def nearest_excluding_groups(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    query_groups: torch.Tensor | None = None,
    bank_groups: torch.Tensor | None = None,
    chunk: int = _CHUNK,
) -> Neighbours:
    """Euclidean distances (Q, k) and indices (Q, k) of the k nearest ``bank`` rows of each query.

    ``query_groups`` (Q,) or (Q, G) holds the group ids each query must not be matched with
    (-1: none); ``bank_groups`` (N,) the group id of every bank row. Without groups this is a
    plain exact search. Raises ValueError when some query has fewer than ``k`` allowed rows.
    """
    bank = bank.float()
    if not 0 < k <= bank.shape[0]:
        raise ValueError(f"cannot find {k} neighbours in a bank of {bank.shape[0]}")
    if (query_groups is None) != (bank_groups is None):
        raise ValueError("give both query_groups and bank_groups, or neither")
    if query_groups is not None and query_groups.ndim == 1:
        query_groups = query_groups[:, None]
    bank_sq = (bank * bank).sum(1)
    dists, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk].float()
        d2 = torch.addmm(bank_sq[None, :], q, bank.T, alpha=-2.0).add_((q * q).sum(1, keepdim=True)).clamp_min_(0.0)
        if query_groups is not None:
            assert bank_groups is not None  # both or neither, checked above
            for column in query_groups[start : start + chunk].T:
                d2.masked_fill_(bank_groups[None, :] == column[:, None], float("inf"))
        values, index = torch.topk(d2, k, dim=1, largest=False)
        if not torch.isfinite(values[:, -1]).all():
            raise ValueError(f"some query has fewer than {k} bank entries outside its own groups")
        dists.append(values.sqrt_())
        indices.append(index)
    if not dists:
        return Neighbours(torch.empty(0, k), torch.empty(0, k, dtype=torch.long))
    return Neighbours(torch.cat(dists), torch.cat(indices))
