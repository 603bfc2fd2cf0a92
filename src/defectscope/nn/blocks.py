"""Convolutional building blocks: double-conv blocks and a plain U-Net-style encoder-decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch norm and ReLU (the block of U-Net and DRAEM)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Sequential):
    """Bilinear 2x upsampling, then a 3x3 convolution with batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class EncoderDecoder(nn.Module):
    """Encoder of :class:`ConvBlock` s with 2x max-pooling between them, mirrored decoder, 1x1 head.

    ``widths`` are the channel counts of the encoder levels, finest first; the input side must
    be divisible by 2^(len(widths) - 1). With ``skips`` the decoder concatenates the encoder
    features of each level (a U-Net); without, the bottleneck is the only path (an autoencoder,
    which cannot simply copy its input through).
    """

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int], skips: bool) -> None:
        super().__init__()
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive channel counts, got {list(widths)}")
        self.skips = skips
        ins = [in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList(ConvBlock(i, o) for i, o in zip(ins, widths))
        self.pool = nn.MaxPool2d(2)
        levels = range(len(widths) - 2, -1, -1)
        self.up = nn.ModuleList(UpBlock(widths[k + 1], widths[k]) for k in levels)
        self.decoder = nn.ModuleList(ConvBlock(widths[k] * (2 if skips else 1), widths[k]) for k in levels)
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for k, block in enumerate(self.encoder):
            x = block(x if k == 0 else self.pool(x))
            features.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(features[:-1])):
            x = up(x)
            x = block(torch.cat([x, skip], 1) if self.skips else x)
        return self.head(x)
