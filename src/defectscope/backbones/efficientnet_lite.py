"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile accelerators).

Lite differs from EfficientNet-B0 by having no squeeze-and-excitation, ReLU6 instead of swish and
a fixed stem/head. The pretrained weights are the TensorFlow checkpoint converted to PyTorch with
the key names of the EfficientNet-(Lite-)PyTorch projects (``_conv_stem``, ``_blocks.N``...), so
this module keeps those names. Two TensorFlow details matter for the converted weights:

* convolutions use TF "SAME" padding: for stride 2 on an even-sized input the padding is
  asymmetric (``k // 2 - 1`` before, ``k // 2`` after), unlike PyTorch's symmetric padding;
* batch norm epsilon is 1e-3.

Inputs are normalised with mean = std = 0.5 (i.e. mapped to [-1, 1]).

The 16 blocks (``_blocks[0..15]``) and the stage outputs, the last block at each stride:

====== ============ ========
layer  block        channels
====== ============ ========
s2     _blocks[0]   16
s4     _blocks[2]   24
s8     _blocks[4]   40
s16    _blocks[10]  112
s32    _blocks[15]  320
====== ============ ========
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import Backbone, Stage

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99

# (kernel, first stride, expansion, output channels, repeats) of each group of blocks.
_GROUPS = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# (layer name, stride, index of its last block in ``_blocks``, channels)
_STAGE_ENDS = (("s2", 2, 0, 16), ("s4", 4, 2, 24), ("s8", 8, 4, 40), ("s16", 16, 10, 112), ("s32", 32, 15, 320))


class SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow "SAME" padding: output size ``ceil(input / stride)``.

    With stride 1 and an odd kernel the padding is symmetric and left to ``nn.Conv2d``; with a
    larger stride it depends on the input size and is added in ``forward``, extra pixel last.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            pads = []
            for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation; shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class Stem(nn.Module):
    """Stride-2 3x3 convolution, batch norm, ReLU6 (shares the model's ``_conv_stem``/``_bn0``)."""

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn(self.conv(x)), inplace=True)


class EfficientNetLite0(Backbone):
    """The ImageNet classifier; input normalised with mean = std = 0.5."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        cin = 32
        for kernel, stride, expansion, cout, repeats in _GROUPS:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expansion))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True).mean(dim=(2, 3))
        return self._fc(self._dropout(x))

    def stages(self) -> list[Stage]:
        """The feature path cut at the last block of each stride."""
        out: list[Stage] = []
        start = 0
        for name, stride, end, channels in _STAGE_ENDS:
            modules = list(self._blocks[start : end + 1])
            if start == 0:
                modules.insert(0, Stem(self._conv_stem, self._bn0))
            out.append(Stage(name, stride, channels, nn.Sequential(*modules)))
            start = end + 1
        return out
