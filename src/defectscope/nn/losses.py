"""Training losses shared by the trained methods: SSIM (structural similarity) and focal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..postprocess import gaussian_kernel


def ssim_map(
    x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004) of two (B, C, H, W) batches, per channel: (B, C, H', W').

    Local means, variances and covariance come from a Gaussian window of side ``window`` (odd)
    and width ``sigma``, applied without padding (so H' = H - window + 1); the constants are
    (0.01 L)^2 and (0.03 L)^2 for data range L. Equal inputs give 1 everywhere.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if window % 2 == 0 or window > min(x.shape[-2:]):
        raise ValueError(f"ssim window must be odd and fit the image, got {window} for {tuple(x.shape[-2:])}")
    g = gaussian_kernel(sigma).to(x)
    radius = g.numel() // 2
    g = g[radius - window // 2 : radius + window // 2 + 1]
    g = g / g.sum()
    channels = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim_loss(
    x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """1 - mean SSIM: 0 for identical images, up to 2 for anti-correlated ones."""
    return 1.0 - ssim_map(x, y, window, sigma, data_range).mean()


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017) of class logits (B, K, ...) against class indices (B, ...).

    Each element contributes ``-alpha[t] * (1 - p_t)^gamma * log p_t`` with ``p_t`` the softmax
    probability of its true class ``t``; with ``gamma=0`` and no ``alpha`` this is cross-entropy.
    Down-weighting the well-classified elements keeps the many easy background pixels of a
    segmentation from swamping the few anomalous ones.
    """
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    loss = -log_p if gamma == 0 else -((1.0 - log_p.exp()).clamp(min=0) ** gamma) * log_p
    if alpha is not None:
        loss = loss * alpha.to(loss)[target.long()]
    return loss.mean()
