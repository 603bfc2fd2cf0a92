"""Exact nearest-neighbour search over a memory bank with faiss (flat L2 index)."""

from __future__ import annotations

import faiss
import numpy as np
import torch


class NearestNeighbors:
    """Exact L2 nearest neighbours of query vectors in a fixed bank of vectors."""

    def __init__(self, bank: torch.Tensor) -> None:
        self.bank = bank.float().contiguous()
        self._index = faiss.IndexFlatL2(self.bank.shape[1])
        self._index.add(self.bank.numpy())

    def __len__(self) -> int:
        return self.bank.shape[0]

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances (Q, k) and bank indices (Q, k) of the k nearest bank vectors."""
        faiss.omp_set_num_threads(torch.get_num_threads())
        q = np.ascontiguousarray(queries.detach().float().numpy())
        dist, idx = self._index.search(q, k)
        return torch.from_numpy(dist).clamp_min_(0.0).sqrt_(), torch.from_numpy(idx)
