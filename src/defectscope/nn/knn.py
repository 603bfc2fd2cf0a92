"""Nearest-neighbour search over a memory bank with faiss.

Small banks use an exact flat L2 index. Large banks use an inverted-file index (k-means cells,
``nprobe`` nearest cells searched per query): on PatchCore banks it returns the exact nearest
neighbour for about 98 % of queries and a near-tie otherwise, at a small fraction of the cost.
Banks larger than memory are searched through IVF-PQ codes and re-ranked exactly
(:mod:`.compressed_index`).
:class:`BankSearch` is the same 1-nearest-neighbour search in plain tensor operations (matrix
products, top-k, a cell mask), so that it traces into an ONNX graph and gives faiss's answers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import faiss
import numpy as np
import torch

from .compressed_index import IvfPqParts, ivfpq_index, reranked

IVF_MIN_BANK = 8192  # below this a flat index is fast enough


class Neighbours(NamedTuple):
    """The k nearest bank vectors of Q queries, nearest first."""

    distances: torch.Tensor  # (Q, k) Euclidean
    indices: torch.Tensor  # (Q, k) rows of the bank


class NearestNeighbors:
    """L2 nearest neighbours of query vectors in a fixed bank of vectors."""

    def __init__(
        self, bank: torch.Tensor, exact: bool = False, nprobe: int = 8, compressed: IvfPqParts | None = None
    ) -> None:
        self.bank = bank.float().contiguous()  # a float32 memory-mapped bank stays mapped
        n, dim = self.bank.shape
        faiss.omp_set_num_threads(torch.get_num_threads())
        self._index: faiss.Index
        #: The IVF-PQ index's tensors when the bank is searched through its codes (:mod:`.compressed_index`).
        self.compressed = compressed
        if compressed is not None:
            self._index = ivfpq_index(compressed, n, dim)
            return
        data = self.bank.numpy()
        if exact or n < IVF_MIN_BANK:
            self._index = faiss.IndexFlatL2(dim)
        else:
            n_cells = int(min(4096, 2 ** round(math.log2(2 * math.sqrt(n)))))
            self._quantizer = faiss.IndexFlatL2(dim)
            ivf = faiss.IndexIVFFlat(self._quantizer, dim, n_cells)
            ivf.cp.seed = 0
            ivf.train(data)
            ivf.nprobe = nprobe
            self._index = ivf
        self._index.add(data)

    def __len__(self) -> int:
        return self.bank.shape[0]

    @property
    def nprobe(self) -> int | None:
        """Cells searched per query, or None for an exact (flat) index."""
        return self._index.nprobe if isinstance(self._index, faiss.IndexIVFFlat) else None

    def cells(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The inverted file: centroids (C, D) and the cell of every bank row (N,); None for a flat index."""
        if not isinstance(self._index, faiss.IndexIVFFlat):
            return None
        ivf = self._index
        centroids = torch.from_numpy(ivf.quantizer.reconstruct_n(0, ivf.nlist))
        cell = torch.full((len(self),), -1, dtype=torch.long)
        lists = ivf.invlists
        assert lists is not None  # an IVF index always has its lists
        for c in range(ivf.nlist):
            size = lists.list_size(c)
            if size:
                ids = faiss.rev_swig_ptr(lists.get_ids(c), size).copy()
                cell[torch.from_numpy(ids.astype(np.int64))] = c
        return centroids, cell

    def search(self, queries: torch.Tensor, k: int = 1) -> Neighbours:
        """Euclidean distances (Q, k) and bank indices (Q, k) of the k nearest bank vectors."""
        faiss.omp_set_num_threads(torch.get_num_threads())
        q = np.ascontiguousarray(queries.detach().float().numpy())
        if self.compressed is not None:
            return Neighbours(*reranked(self._index, self.bank, q, k))
        dist, idx = self._index.search(q, k)
        return Neighbours(torch.from_numpy(dist).clamp_min_(0.0).sqrt_(), torch.from_numpy(idx))


class BankSearch(torch.nn.Module):
    """:meth:`NearestNeighbors.search` with k = 1 as tensor operations: distances (Q,) and bank rows (Q,).

    Squared distances are ``|q|^2 - 2 q.b + |b|^2``, computed by matrix products against the bank in
    chunks (the distance matrix of a large batch stays small). For an inverted-file index, a query
    may match only rows of the ``nprobe`` cells whose centroids are nearest to it, as in faiss: the
    bank is stored cell by cell in blocks of ``block`` rows (padded), each block's nearest row is
    found first, and blocks of cells a query does not probe are then ruled out, so the cell mask
    costs one value per block instead of one per row.
    """

    bank: torch.Tensor  # buffers: the bank (N, D), the bank row of each padded row (R,),
    rows: torch.Tensor
    block_cell: torch.Tensor  # the cell of each block, and the index's centroids (C, D) with their norms
    centroids: torch.Tensor
    centroid_norms: torch.Tensor

    def __init__(self, index: NearestNeighbors, chunk: int = 2048, block: int = 16) -> None:
        super().__init__()
        cells = index.cells()
        self.nprobe = index.nprobe or 0
        if cells is None:
            rows, block_cell, self.block = torch.arange(len(index)), torch.zeros(0, dtype=torch.long), 1
            chunk = max(chunk, 4096)  # one minimum per chunk: larger chunks, fewer of them
        else:
            centroids, cell = cells
            self.register_buffer("centroids", centroids)
            self.register_buffer("centroid_norms", (centroids * centroids).sum(1))
            self.block = block
            parts, owners = [], []
            for c in range(centroids.shape[0]):
                members = (cell == c).nonzero()[:, 0]
                n_blocks = -(-len(members) // block)
                padded = torch.full((n_blocks * block,), -1, dtype=torch.long)
                padded[: len(members)] = members
                parts.append(padded)
                owners.append(torch.full((n_blocks,), c, dtype=torch.long))
            rows, block_cell = torch.cat(parts), torch.cat(owners)
        padded = index.bank[rows.clamp_min(0)] * (rows >= 0)[:, None]
        norms = torch.where(rows >= 0, (padded * padded).sum(1), torch.tensor(1e30))  # padding never wins
        self.register_buffer("bank", index.bank)
        self.register_buffer("rows", rows.clamp_min(0))
        self.register_buffer("block_cell", block_cell)
        step = max(self.block, chunk // self.block * self.block)
        self.starts = list(range(0, len(rows), step))
        for i, start in enumerate(self.starts):  # one constant per chunk (transposed), not slices of one
            self.register_buffer(f"chunk_{i}", padded[start : start + step].T.contiguous())
            self.register_buffer(f"chunk_norms_{i}", norms[start : start + step])

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, where = [], []
        for i, start in enumerate(self.starts):
            # |b|^2 - 2 q.b in one fused product; |q|^2 does not move the minimum and is left out
            d = torch.addmm(getattr(self, f"chunk_norms_{i}"), queries, getattr(self, f"chunk_{i}"), alpha=-2.0)
            if self.nprobe:  # the nearest row of every block of this chunk
                value, offset = d.reshape(d.shape[0], -1, self.block).min(2)
                offset = offset + torch.arange(start, start + d.shape[1], self.block, device=d.device)
            else:
                value, offset = d.min(1, keepdim=True)
                offset = offset + start
            best.append(value)
            where.append(offset)
        values, positions = torch.cat(best, 1), torch.cat(where, 1)
        if self.nprobe:  # rule out the blocks of cells the query does not probe
            q_norms = (queries * queries).sum(1, keepdim=True)
            to_cells = q_norms - 2 * queries @ self.centroids.T + self.centroid_norms
            probed = torch.topk(to_cells, self.nprobe, dim=1, largest=False).indices
            allowed = torch.zeros_like(to_cells).scatter(1, probed, 1.0)[:, self.block_cell] > 0
            values = torch.where(allowed, values, torch.full_like(values, float("inf")))
        row = self.rows[positions.gather(1, values.argmin(1, keepdim=True))[:, 0]]
        # the distance to the chosen row directly: the expanded form loses precision near 0 (a patch seen in fitting)
        return torch.linalg.vector_norm(queries - self.bank[row], dim=1), row
