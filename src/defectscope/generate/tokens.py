"""The cross-attention context of the defect generator: learned anomaly tokens and spatial tokens from the mask.

AnomalyDiffusion (Hu et al. 2024, sec. 3.2) conditions the denoiser on a *spatial anomaly
embedding*: per defect type ``k`` learned anomaly-embedding tokens (what the defect looks like),
concatenated with ``n`` spatial-embedding tokens that one mask encoder, shared by all types,
computes from the defect's mask (where it is). The paper states k = 8 and n = 4; the official
code uses 4 + 4, and so do the defaults here. The mask generator uses the anomaly tokens alone.

Training from scratch, the denoiser must also learn good surfaces, so good images get a learned
"good" context of the same length instead (see :mod:`defectscope.generate.generator`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Masks are resized to this square before the mask encoder, so one encoder serves every image size.
MASK_ENCODER_INPUT = 64


class MaskEncoder(nn.Module):
    """Mask (B, 1, H, W) in [0, 1] -> ``n_tokens`` spatial-embedding tokens (B, n_tokens, dim).

    A small strided CNN keeps a 4 x 4 grid of features, so the tokens know where the mask lies,
    not only how large it is.
    """

    def __init__(self, n_tokens: int, dim: int, width: int = 32) -> None:
        super().__init__()
        self.n_tokens, self.dim = n_tokens, dim
        self.features = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.project = nn.Linear(width * 16, n_tokens * dim)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks.float(), size=(MASK_ENCODER_INPUT, MASK_ENCODER_INPUT), mode="area")
        tokens = self.project(self.features(masks * 2 - 1).flatten(1))
        return tokens.view(masks.shape[0], self.n_tokens, self.dim)


class DefectTokens(nn.Module):
    """The learned context: per type ``anomaly_tokens`` vectors (+ spatial tokens from the mask, + a good context).

    ``context(types, masks)`` gives (B, anomaly_tokens + spatial_tokens, dim); a type index of -1
    selects the learned good context (only when ``good_context``).
    """

    def __init__(
        self, n_types: int, dim: int, anomaly_tokens: int, spatial_tokens: int = 0, good_context: bool = False
    ) -> None:
        super().__init__()
        self.n_types, self.dim = n_types, dim
        self.anomaly_tokens, self.spatial_tokens = anomaly_tokens, spatial_tokens
        self.anomaly = nn.Parameter(torch.randn(n_types, anomaly_tokens, dim) * 0.5)
        self.encoder = MaskEncoder(spatial_tokens, dim) if spatial_tokens else None
        self.good = nn.Parameter(torch.randn(anomaly_tokens + spatial_tokens, dim) * 0.5) if good_context else None

    @property
    def length(self) -> int:
        """Number of context tokens."""
        return self.anomaly_tokens + self.spatial_tokens

    def forward(self, types: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        context = self.anomaly[types.clamp(min=0)]
        if self.encoder is not None:
            if masks is None:
                raise ValueError("the spatial anomaly embedding needs the defect masks")
            context = torch.cat([context, self.encoder(masks)], dim=1)
        if self.good is not None:
            good = self.good.expand(types.shape[0], -1, -1)
            context = torch.where((types < 0).view(-1, 1, 1), good, context)
        elif bool((types < 0).any()):
            raise ValueError("type index -1 (good) needs a good context")
        return context
