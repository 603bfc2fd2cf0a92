"""MobileNetV2 (Sandler et al., 2018), width 1.0, with torchvision's state-dict key names.

``features`` holds 19 modules: ``features[0]`` is the stride-2 stem, ``features[1..17]`` the
inverted-residual blocks and ``features[18]`` the 1x1 head convolution. The stage outputs are the
last block at each stride:

====== ============== ========
layer  block          channels
====== ============== ========
s2     features[1]    16
s4     features[3]    24
s8     features[6]    32
s16    features[13]   96
s32    features[17]   320
====== ============== ========
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Backbone, Stage

# (expansion t, output channels c, repeats n, stride of the first repeat s), from the paper.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# (layer name, stride, index of its last block in ``features``, channels)
_STAGE_ENDS = (("s2", 2, 1, 16), ("s4", 4, 3, 24), ("s8", 8, 6, 32), ("s16", 16, 13, 96), ("s32", 32, 17, 320))


class ConvBNReLU6(nn.Sequential):
    """Convolution, batch norm, ReLU6 (keys ``.0`` conv, ``.1`` bn)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, linear project 1x1; identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = [] if expansion == 1 else [ConvBNReLU6(cin, hidden, kernel=1)]
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(Backbone):
    """The ImageNet classifier; input normalised with the ImageNet mean/std."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        blocks: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        blocks.append(ConvBNReLU6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self.classifier(x)

    def stages(self) -> list[Stage]:
        """The feature path cut at the last block of each stride."""
        out, start = [], 0
        for name, stride, end, channels in _STAGE_ENDS:
            out.append(Stage(name, stride, channels, self.features[start : end + 1]))
            start = end + 1
        return out
