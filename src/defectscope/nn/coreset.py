"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

The classic greedy algorithm picks, one at a time, the point farthest from everything picked so
far, and after each pick streams the whole bank once to update the distances: memory-bandwidth
bound, and quadratic in practice. Here the distance update is done for a *block* of picks at once
with one matrix product, while the picks themselves stay exactly those of the one-at-a-time
algorithm:

* take the ``c`` points with the largest current distance (the candidates) and the ``c+1``-th
  largest distance ``tau``; every other point is at most ``tau`` away from the coreset, and
  distances only ever shrink;
* pick greedily among the candidates, updating only their distances (cheap, ``c x c``), for as long
  as the best candidate is still farther than ``tau`` - each such pick is provably the one the
  sequential algorithm would make;
* then update the distances of all points to the new block of picks in one GEMM.

Distances are computed on a random Gaussian projection of the features (Johnson-Lindenstrauss),
as in the paper's approximate greedy coreset, to cut the cost further.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..progress import progress_enabled

_ROW_CHUNK = 65536  # rows per GEMM chunk: bounds the temporary distance matrix to chunk x block


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Project ``features`` (N, D) to ``dim`` dimensions with a seeded Gaussian matrix (no-op if D <= dim)."""
    n_features = features.shape[1]
    if n_features <= dim:
        return features.float()
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(n_features, dim, generator=gen) / math.sqrt(dim)
    return features.float() @ matrix


def _sq_distances(points: torch.Tensor, point_norms: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, K) from ``points`` to ``centers``, clamped at zero."""
    center_norms = (centers * centers).sum(1)
    dist = point_norms[:, None] + center_norms[None, :] - 2.0 * (points @ centers.T)
    return dist.clamp_min_(0.0)


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    *,
    projection_dim: int = 128,
    block: int = 128,
    seed: int = 0,
    desc: str | None = None,
) -> torch.Tensor:
    """Indices (n_select,) of a greedy k-center coreset of ``features`` (N, D).

    Identical picks to the sequential greedy algorithm on the projected features, for the same
    start point; only the order of floating-point work differs.
    """
    n_points = features.shape[0]
    if not 0 < n_select <= n_points:
        raise ValueError(f"cannot select {n_select} of {n_points} points")
    points = random_projection(features, projection_dim, seed).contiguous()
    state = _CoverState(points, n_select)
    start = int(torch.randint(n_points, (1,), generator=torch.Generator().manual_seed(seed)))
    state.add(torch.tensor([start]))
    with tqdm(total=n_select, desc=desc, unit="pt", disable=not progress_enabled() or desc is None) as bar:
        bar.update(1)
        while state.count < n_select:
            picks = _pick_block(state, min(block, n_select - state.count), 4 * block)
            state.add(picks)
            bar.update(len(picks))
    return state.centers[: state.count]


def _pick_block(state: _CoverState, wanted: int, n_candidates: int) -> torch.Tensor:
    """Up to ``wanted`` next greedy picks, provably those the one-at-a-time algorithm makes."""
    k = min(n_candidates, state.points.shape[0] - 1)
    values, cand = torch.topk(state.min_dist, k + 1)
    tau = float(values[k])  # every non-candidate is at most this far from the coreset
    cand, cand_dist = cand[:k], values[:k].clone()
    cand_points, cand_norms = state.points[cand], state.norms[cand]
    picks: list[int] = []
    for _ in range(wanted):
        best = int(torch.argmax(cand_dist))
        if picks and float(cand_dist[best]) <= tau:
            break  # a non-candidate might now be the farthest point
        picks.append(best)
        new = _sq_distances(cand_points, cand_norms, cand_points[[best]])[:, 0]
        torch.minimum(cand_dist, new, out=cand_dist)
    return cand[picks]


class _CoverState:
    """Squared distance of every point to its nearest selected center."""

    def __init__(self, points: torch.Tensor, capacity: int) -> None:
        self.points = points
        self.norms = (points * points).sum(1)
        self.min_dist = torch.full((points.shape[0],), float("inf"))
        self.centers = torch.empty(capacity, dtype=torch.long)
        self.count = 0
        self._buffer: torch.Tensor | None = None
        self._nearest = torch.empty(0)

    def add(self, new: torch.Tensor) -> None:
        """Add the point indices ``new`` as centers; one fused GEMM pass over the bank per call.

        Uses min_j |x - c_j|^2 = |x|^2 + min_j (|c_j|^2 - 2 x.c_j), chunked over rows into reused
        buffers, so the pass allocates nothing large.
        """
        new_points = self.points[new]
        new_norms = (new_points * new_points).sum(1)[None, :]
        rows = min(_ROW_CHUNK, self.points.shape[0])
        if self._buffer is None or self._buffer.shape[1] < new.shape[0]:
            self._buffer = torch.empty(rows, max(new.shape[0], 128))
            self._nearest = torch.empty(rows)
        for start in range(0, self.points.shape[0], _ROW_CHUNK):
            stop = min(start + _ROW_CHUNK, self.points.shape[0])
            out = self._buffer[: stop - start, : new.shape[0]]
            torch.addmm(new_norms, self.points[start:stop], new_points.T, alpha=-2.0, out=out)
            nearest = torch.amin(out, 1, out=self._nearest[: stop - start])
            nearest.add_(self.norms[start:stop]).clamp_min_(0.0)
            torch.minimum(self.min_dist[start:stop], nearest, out=self.min_dist[start:stop])
        self.min_dist[new] = 0.0
        self.centers[self.count : self.count + new.shape[0]] = new
        self.count += new.shape[0]


def coverage(points: torch.Tensor, coreset: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """Largest and mean Euclidean distance from each of ``points`` (N, D) to its nearest row of ``coreset``
    (M, D): the k-center radius the coreset achieves on those points, and its typical value."""
    norms = (coreset * coreset).sum(1)
    largest, total = 0.0, 0.0
    for start in range(0, points.shape[0], chunk):
        x = points[start : start + chunk]
        sq = torch.addmm(norms[None, :], x, coreset.T, alpha=-2.0).amin(1) + (x * x).sum(1)
        d = sq.clamp_min(0.0).sqrt()
        largest, total = max(largest, float(d.max())), total + float(d.sum())
    return largest, total / points.shape[0]
