"""ResNet-18 (He et al., 2016) and Wide ResNet-50-2 (Zagoruyko & Komodakis, 2016).

Key names follow torchvision, so its official state dicts load strictly. The bottleneck puts the
stride on the 3x3 convolution ("ResNet v1.5"), as those weights expect. Wide ResNet-50-2 is
ResNet-50 with twice the channels inside each bottleneck.

Stage outputs: s2 is the stem (conv1, bn1, relu), s4..s32 are ``layer1``..``layer4``
(s4 includes the max-pool). Channels: ResNet-18 64, 64, 128, 256, 512; Wide ResNet-50-2
64, 256, 512, 1024, 2048.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .common import Backbone, Stage


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1 projection shortcut where the residual changes shape, else ``None``."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (ResNet-18/34)."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.out_channels = planes
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, strided 3x3, 1x1 expand (x4) with a shortcut (ResNet-50 and wider)."""

    def __init__(self, cin: int, planes: int, stride: int = 1, width_factor: int = 1) -> None:
        super().__init__()
        width = planes * width_factor
        cout = self.out_channels = planes * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNet(Backbone):
    """The ImageNet classifier; input normalised with the ImageNet mean/std."""

    def __init__(
        self,
        block: Callable[[int, int, int], BasicBlock | Bottleneck],
        depths: tuple[int, int, int, int],
        num_classes: int = 1000,
    ) -> None:
        """``block(in_channels, planes, stride)`` builds one residual block."""
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        self.channels = [64]
        layers = []
        for i, depth in enumerate(depths):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, 64 * 2**i, 2 if (i > 0 and j == 0) else 1))
                cin = blocks[-1].out_channels
            layers.append(nn.Sequential(*blocks))
            self.channels.append(cin)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage.module(x)
        return self.fc(x.mean(dim=(2, 3)))

    def stages(self) -> list[Stage]:
        """Stem, then one stage per residual layer."""
        c = self.channels
        return [
            Stage("s2", 2, c[0], nn.Sequential(self.conv1, self.bn1, self.relu)),
            Stage("s4", 4, c[1], nn.Sequential(self.maxpool, self.layer1)),
            Stage("s8", 8, c[2], self.layer2),
            Stage("s16", 16, c[3], self.layer3),
            Stage("s32", 32, c[4], self.layer4),
        ]


def resnet18() -> ResNet:
    """ResNet-18: basic blocks, depths 2-2-2-2."""
    return ResNet(BasicBlock, (2, 2, 2, 2))


def wide_resnet50_2() -> ResNet:
    """Wide ResNet-50-2: bottlenecks of twice the usual width, depths 3-4-6-3."""
    return ResNet(partial(Bottleneck, width_factor=2), (3, 4, 6, 3))
