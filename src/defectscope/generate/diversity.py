"""IC-FD: the intra-cluster diversity protocol of IC-LPIPS with an EfficientNet-Lite0 feature distance.

IC-LPIPS (Ojha et al. 2021, used by AnomalyDiffusion) assigns every generated image to the nearest
of the k real training images, averages the pairwise LPIPS distance inside each cluster (the first
50 members of it) and averages over the clusters with at least two members. LPIPS needs AlexNet or
VGG weights and learnt linear layers that cannot be obtained here, so the distance is replaced by
the one LPIPS is built on, without its learnt weights: **IC-FD (EfficientNet-Lite0 feature
distance)**. For stages s4, s8, s16 and s32 of the pretrained EfficientNet-Lite0, features are
normalised to unit length over channels at every position; the distance of two images is the
squared difference averaged over positions and summed over stages (0 for identical images, at
most 4 per stage). Its values are not comparable with published IC-LPIPS numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..backbones import create_backbone

IC_FD_NAME = "IC-FD (EfficientNet-Lite0 feature distance)"
IC_FD_LAYERS = ("s4", "s8", "s16", "s32")
#: Members per cluster whose pairwise distances are averaged (the IC-LPIPS protocol's 50).
CLUSTER_SIZE = 50
_EPS = 1e-10  # LPIPS's guard for the channel norm


class FeatureDistance:
    """Embeds images so that the squared Euclidean distance of two embeddings is their IC-FD distance.

    The embedding of an image is its unit-normalised stage features, each stage divided by the square
    root of its number of positions, flattened and concatenated (float32, one row per image).
    """

    def __init__(self, device: str | torch.device = "cpu", layers: Sequence[str] = IC_FD_LAYERS) -> None:
        self.device = torch.device(device)
        self.extractor = create_backbone("efficientnet_lite0", layers=layers).to(self.device)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, 3, H, W) of one size -> (B, D) float32 embeddings on the CPU."""
        x = images.to(self.device, torch.float32).div_(255.0)
        parts = []
        for feats in self.extractor(x):
            unit = feats / (feats.norm(dim=1, keepdim=True) + _EPS)
            positions = feats.shape[-2] * feats.shape[-1]
            parts.append((unit / positions**0.5).flatten(1))
        return torch.cat(parts, dim=1).cpu()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) squared Euclidean distances between the rows of ``a`` and ``b`` (never negative)."""
    a64, b64 = a.double(), b.double()
    d = (a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None, :] - 2.0 * a64 @ b64.T
    return d.clamp_(min=0.0)


@dataclass(frozen=True)
class Diversity:
    """The IC-FD of a generated set: the value (None without a cluster of two) and the clusters' sizes."""

    value: float | None
    cluster_sizes: list[int]
    clusters_used: int
    cluster_size: int

    def as_dict(self) -> dict[str, object]:
        """The JSON form, named by :data:`IC_FD_NAME`."""
        return {
            "name": IC_FD_NAME,
            "value": self.value,
            "cluster_sizes": self.cluster_sizes,
            "clusters_used": self.clusters_used,
            "cluster_size": self.cluster_size,
        }


def intra_cluster_distance(
    centres: torch.Tensor, generated: Iterable[torch.Tensor], cluster_size: int = CLUSTER_SIZE
) -> Diversity:
    """IC-FD of generated embeddings (batches, in file order) against the training images' embeddings.

    Each generated image joins the cluster of its nearest centre (the first on ties); the first
    ``cluster_size`` members of each cluster are kept, so memory stays at ``k * cluster_size`` rows.
    """
    if cluster_size < 2:
        raise ValueError(f"cluster_size must be at least 2, got {cluster_size}")
    sizes = [0] * len(centres)
    kept: list[list[torch.Tensor]] = [[] for _ in range(len(centres))]
    for batch in generated:
        for row, nearest in zip(batch, squared_distances(batch, centres).argmin(dim=1).tolist()):
            sizes[nearest] += 1
            if len(kept[nearest]) < cluster_size:
                kept[nearest].append(row)
    means = []
    for members in kept:
        if len(members) < 2:
            continue
        rows = torch.stack(members)
        d = squared_distances(rows, rows)
        n = len(members)
        means.append(float(d.sum() - d.diagonal().sum()) / (n * (n - 1)))  # the mean over the pairs i != j
    value = sum(means) / len(means) if means else None
    return Diversity(value, sizes, len(means), cluster_size)
