"""DMAD's patch scorer: the enhanced representation from both banks, and the anchored MLP on it."""

from __future__ import annotations

import torch

from ...nn.knn import Neighbours


def knowledge(
    queries: torch.Tensor,
    normal_bank: torch.Tensor,
    normal: Neighbours,
    anomaly_bank: torch.Tensor,
    anomaly: Neighbours,
    scale: float,
) -> torch.Tensor:
    """Enhanced representation (Q, 3 D + 2 k) of queries (Q, D) from their neighbours in both banks.

    ``normal`` and ``anomaly`` are the k nearest entries of the queries in each bank. Per bank:
    the distances divided by ``scale`` and the query minus the attention-weighted mean of the
    neighbours (weights: softmax of minus the squared scaled distances). Layout: [query,
    query - normal read-out, normal distances, query - anomaly read-out, anomaly distances].
    """
    parts = [queries]
    for bank, (dist, index) in ((normal_bank, normal), (anomaly_bank, anomaly)):
        scaled = dist / scale
        weights = torch.softmax(-scaled * scaled, dim=1)
        readout = torch.einsum("qk,qkd->qd", weights, bank[index])
        parts += [queries - readout, scaled]
    return torch.cat(parts, dim=1)


class Scorer(torch.nn.Module):
    """Patch logit = w * (standardised nearest-normal distance) + b + bound * tanh(MLP(representation)).

    The MLP reads the whole enhanced representation but can move the logit by at most
    ``bound`` away from the distance-based score it is anchored to, so a patch far from every
    normal patch stays anomalous even when it resembles no (pseudo-)anomaly seen in training.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], anchor: int, bound: float) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
            width = size
        layers.append(torch.nn.Linear(width, 1))
        self.mlp = torch.nn.Sequential(*layers)
        self.weight = torch.nn.Parameter(torch.tensor(1.0))
        self.bias = torch.nn.Parameter(torch.tensor(0.0))
        self.anchor, self.bound = anchor, bound

    @classmethod
    def for_representation(cls, in_dim: int, num_neighbors: int, hidden: tuple[int, ...], bound: float) -> Scorer:
        """A scorer of :func:`knowledge` representations of width ``in_dim``, anchored on their
        nearest-normal distance."""
        feature_dim = (in_dim - 2 * num_neighbors) // 3
        return cls(in_dim, hidden, anchor=2 * feature_dim, bound=bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N,) for standardised representations (N, in_dim)."""
        return self.weight.abs() * x[:, self.anchor] + self.bias + self.bound * torch.tanh(self.mlp(x)[:, 0])
