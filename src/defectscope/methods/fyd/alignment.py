"""Affine spatial transformers for FYD's coarse alignment, made of traceable tensor operations.

An affine map ``theta`` (B, 2, 3) sends a position of the output (aligned) frame to a position of
the input frame, in normalised coordinates (-1 and 1 are the outer edges of the image, as
``grid_sample(..., align_corners=False)`` reads them); so ``warp(x, theta)[p] = x[theta p]``, and
the same ``theta`` means the same geometric map at every resolution. The sampling grid is built
from a constant base grid and one matrix product (not ``affine_grid``), so the whole path exports
to ONNX (``GridSample``, opset 16 and later).
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...postprocess import gaussian_blur


class Ranges:
    """The largest rotation (degrees), relative scale change and shift (share of the side) a transformer may apply."""

    def __init__(self, rotation: float, scale: float, shift: float) -> None:
        self.rotation, self.scale, self.shift = rotation, scale, shift

    def scaled(self, factor: float) -> Ranges:
        return Ranges(self.rotation * factor, self.scale * factor, self.shift * factor)

    def limits(self) -> torch.Tensor:
        """(4,) bounds of (angle in radians, log scale, shift x, shift y in normalised units)."""
        return torch.tensor([math.radians(self.rotation), math.log1p(self.scale), 2 * self.shift, 2 * self.shift])


def affine(params: torch.Tensor) -> torch.Tensor:
    """(B, 4) (angle, log scale, shift x, shift y) -> (B, 2, 3): rotate and scale about the centre, then shift."""
    angle, log_scale, tx, ty = params.unbind(1)
    scale = log_scale.exp()
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def pose(theta: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) -> (B, 4) (angle, log scale, shift x, shift y), the inverse of :func:`affine` for its maps."""
    angle = torch.atan2(theta[:, 1, 0], theta[:, 0, 0])
    det = theta[:, 0, 0] * theta[:, 1, 1] - theta[:, 0, 1] * theta[:, 1, 0]
    return torch.stack([angle, 0.5 * det.clamp_min(1e-6).log(), theta[:, 0, 2], theta[:, 1, 2]], 1)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The map ``p -> outer(inner(p))``: warping by it equals warping by ``outer``, then by ``inner``."""
    linear = outer[:, :, :2] @ inner[:, :, :2]
    shift = outer[:, :, :2] @ inner[:, :, 2:] + outer[:, :, 2:]
    return torch.cat([linear, shift], 2)


def invert(theta: torch.Tensor) -> torch.Tensor:
    """The inverse affine maps (closed form of the 2 x 2 inverse, so it traces to plain arithmetic)."""
    a, b, c, d = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    det = a * d - b * c
    linear = torch.stack([torch.stack([d, -b], 1), torch.stack([-c, a], 1)], 1) / det[:, None, None]
    return torch.cat([linear, -linear @ theta[:, :, 2:]], 2)


def identity(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n, 2, 3) identity maps with the dtype and device of ``like``."""
    return torch.eye(2, 3, dtype=like.dtype, device=like.device).expand(n, 2, 3)


def random_affine(n: int, ranges: Ranges) -> torch.Tensor:
    """(n, 2, 3) maps with angle, log scale and shifts uniform within ``ranges`` (torch's global generator)."""
    return affine((torch.rand(n, 4) * 2 - 1) * ranges.limits())


@lru_cache(maxsize=32)
def _base_grid(h: int, w: int) -> torch.Tensor:
    """(h * w, 3) normalised pixel centres (x, y, 1), row-major; built in numpy so tracing keeps it a constant."""
    xs = (2 * np.arange(w) + 1) / w - 1
    ys = (2 * np.arange(h) + 1) / h - 1
    gx, gy = np.meshgrid(xs, ys)
    return torch.from_numpy(np.stack([gx.ravel(), gy.ravel(), np.ones(h * w)], 1).astype(np.float32))


def warp(x: torch.Tensor, theta: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """``x`` (B, C, h, w) resampled bilinearly at ``theta`` applied to its own grid; outside is ``padding``."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    grid = (_base_grid(h, w).to(x.device) @ theta.transpose(1, 2).to(x.dtype)).view(-1, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size): average pooling by the whole factor, then bilinear resizing
    (``adaptive_avg_pool2d`` does not export to ONNX for most sizes)."""
    factor = max(1, min(int(x.shape[-2]), int(x.shape[-1])) // size)
    if factor > 1:
        x = F.avg_pool2d(x, factor)
    if int(x.shape[-2]) != size or int(x.shape[-1]) != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def switch_off(aligner: nn.Module) -> None:
    """Zero the last layer of an aligner's transform head: it then predicts the identity for every input."""
    head = aligner.head
    assert isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear)
    last = head[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def _head(features: int, hidden: int) -> nn.Sequential:
    """Two linear layers ending in the 4 transform parameters, the last one zero: the identity at the start."""
    last = nn.Linear(hidden, 4)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), last)


class ImageAligner(nn.Module):
    """Image-level spatial transformer: a small CNN on a blurred, standardised grey thumbnail of the image
    predicts a bounded affine map. It runs ``iterations`` times: each pass sees the thumbnail as the
    passes before aligned it and adds a correction to their parameters before the bound, so the result
    stays within ``ranges`` (a second pass halves the error left in scale). ``template`` is the running
    mean of the aligned training thumbnails."""

    template: torch.Tensor
    limits: torch.Tensor

    def __init__(self, size: int, ranges: Ranges, blur_sigma: float = 1.0, iterations: int = 2) -> None:
        super().__init__()
        self.size, self.blur_sigma, self.iterations = size, blur_sigma, iterations
        self.register_buffer("limits", ranges.limits(), persistent=False)
        self.register_buffer("template", torch.zeros(1, 1, size, size))
        layers: list[nn.Module] = []
        channels = [1, 16, 32, 64, 64]
        for c_in, c_out in pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = _head(64 * (size // 16) ** 2, 128)

    def thumbnail(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, size, size): grey, downsampled, blurred, zero mean and unit variance."""
        grey = gaussian_blur(pool_to(images.mean(1, keepdim=True), self.size)[:, 0], self.blur_sigma)[:, None]
        mean = grey.mean((2, 3), keepdim=True)
        std = (grey - mean).pow(2).mean((2, 3), keepdim=True).sqrt()
        return (grey - mean) / (std + 1e-3)

    def transform(self, thumbnails: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3) maps from the aligned frame into the frame of ``thumbnails``."""
        raw = self.head(self.body(thumbnails))
        for _ in range(self.iterations - 1):
            raw = raw + self.head(self.body(warp(thumbnails, self._bounded(raw))))
        return self._bounded(raw)

    def _bounded(self, raw: torch.Tensor) -> torch.Tensor:
        return affine(torch.tanh(raw) * self.limits)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned images (reflected at the border) and their maps (B, 2, 3)."""
        theta = self.transform(self.thumbnail(images))
        return warp(images, theta, "reflection"), theta


class FeatureAligner(nn.Module):
    """Feature-level spatial transformer after one backbone stage: (B, C, h, w) -> a bounded map (B, 2, 3)."""

    limits: torch.Tensor

    def __init__(self, channels: int, ranges: Ranges, width: int = 32) -> None:
        super().__init__()
        self.register_buffer("limits", ranges.limits(), persistent=False)
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = _head(width * 16, 64)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return affine(torch.tanh(self.head(pool_to(self.body(features), 4).flatten(1))) * self.limits)


class SiameseHead(nn.Module):
    """SimSiam projector and predictor as 1 x 1 convolutions, so every position is one sample."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        hidden = max(dim // 4, 8)
        self.projector = nn.Sequential(
            nn.Conv2d(channels, dim, 1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1, bias=False),
            nn.BatchNorm2d(dim),
        )
        self.predictor = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, dim, 1)
        )

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        """Negative cosine similarity between each image's prediction and the stop-gradient projection of
        its neighbours in the batch (both directions), at the same position, averaged over positions."""
        z = self.projector(features)
        p = self.predictor(z)
        target = z.detach()
        similarity = F.cosine_similarity(p, target.roll(1, 0), dim=1) + F.cosine_similarity(
            p, target.roll(-1, 0), dim=1
        )
        return -0.5 * similarity.mean()
