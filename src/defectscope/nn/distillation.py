"""Shared pieces of the knowledge-distillation methods (Uninformed Students, MKD, reverse distillation).

A frozen pretrained teacher gives feature maps; a trained network learns to reproduce them on good
images only, so where it fails to, the image is unusual. This module holds what those methods
share: per-position feature distances, the multi-scale discrepancy map, a strided conv block,
running statistics, and teacher features computed once and served next to the cached training
images (the teacher is frozen and there is no augmentation, so recomputing them every epoch
would only cost time).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import ItemSource, iterate_batches

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_distance(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of the channel vectors at each position: (B, C, h, w) -> (B, h, w)."""
    return 1.0 - F.cosine_similarity(output, target, dim=1, eps=1e-8)


def squared_distance(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the squared difference at each position: (B, C, h, w) -> (B, h, w)."""
    return (output - target).pow(2).mean(dim=1)


def discrepancy_map(
    outputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    size: tuple[int, int],
    distance: Distance = cosine_distance,
) -> torch.Tensor:
    """Sum over scales of the per-position ``distance``, each upsampled bilinearly to ``size``: (B, H, W)."""
    total = None
    for output, target in zip(outputs, targets, strict=True):
        d = F.interpolate(
            distance(output.float(), target.float())[:, None], size=size, mode="bilinear", align_corners=False
        )[:, 0]
        total = d if total is None else total + d
    if total is None:
        raise ValueError("discrepancy_map needs at least one scale")
    return total


def conv_block(
    in_channels: int,
    out_channels: int,
    *,
    stride: int = 1,
    kernel: int = 3,
    batch_norm: bool = True,
    activation: Callable[[], nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Convolution ("same" padding, ``stride``), optional batch norm, optional activation; no conv bias.

    Without batch norm the block has no bias term at all (MKD's cloner relies on that).
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class StridedHeads(nn.Module):
    """A CNN of stride-2 stages (stage ``l`` at stride 2**l) with a 1x1 head after each of ``levels``.

    Stage ``l`` has ``width(l)`` channels and is one strided ``block(c_in, c_out, stride=2)``,
    followed from stage 2 on by a ``block(c, c)``; the head at level ``levels[i]`` maps to
    ``channels[i]``. The output is the list of head outputs, finest first.
    """

    def __init__(
        self,
        channels: Sequence[int],
        levels: Sequence[int],
        width: Callable[[int], int],
        block: Callable[..., nn.Module],
        head_bias: bool = True,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleDict()
        c_in = 3
        for level in range(1, max(levels) + 1):
            w = width(level)
            stage = [block(c_in, w, stride=2)]
            if level > 1:
                stage.append(block(w, w))
            self.stages.append(nn.Sequential(*stage))
            if level in levels:
                self.heads[str(level)] = nn.Conv2d(w, channels[list(levels).index(level)], 1, bias=head_bias)
            c_in = w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for level, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if str(level) in self.heads:
                outputs.append(self.heads[str(level)](x))
        return outputs


def stride_index(layer: str) -> int:
    """log2 of a backbone layer's stride: "s2" -> 1, "s16" -> 4."""
    stride = int(layer.removeprefix("s"))
    if stride < 2 or stride & (stride - 1):
        raise ValueError(f"layer {layer!r} is not a power-of-two stride name like 's8'")
    return stride.bit_length() - 1


class RunningMoments:
    """Mean and standard deviation per channel of (B, C, ...) tensors, accumulated in float64."""

    def __init__(self) -> None:
        self.count = 0
        self._sum: torch.Tensor | None = None
        self._sumsq: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        s, sq = flat.sum(1), flat.pow(2).sum(1)
        self._sum = s if self._sum is None else self._sum + s
        self._sumsq = sq if self._sumsq is None else self._sumsq + sq
        self.count += flat.shape[1]

    def mean(self) -> torch.Tensor:
        if self._sum is None:
            raise ValueError("no values were accumulated")
        return (self._sum / self.count).float()

    def std(self, eps: float = 1e-6) -> torch.Tensor:
        if self._sum is None or self._sumsq is None:
            raise ValueError("no values were accumulated")
        mean = self._sum / self.count
        var = (self._sumsq / self.count - mean.pow(2)).clamp(min=0) * self.count / max(self.count - 1, 1)
        return var.sqrt().clamp(min=eps).float()


class TeacherTargets:
    """An item source whose items also carry precomputed teacher features as ``target0``, ``target1``, ...

    Features are stored as float16 (they are only regression targets, and halving their memory
    keeps large images practical) and served as float32.
    """

    def __init__(self, source: ItemSource, features: Sequence[torch.Tensor]) -> None:
        if any(len(f) != len(source) for f in features):
            raise ValueError("one feature map per source item is needed")
        self.source = source
        self.features = [f.to(torch.float16) for f in features]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.source[index]
        for k, feature in enumerate(self.features):
            item[f"target{k}"] = feature[index].float()
        return item

    @classmethod
    def compute(
        cls,
        source: ItemSource,
        teacher: Callable[[torch.Tensor], list[torch.Tensor]],
        batch_size: int,
        desc: str | None = "teacher features",
    ) -> TeacherTargets:
        """Run the frozen ``teacher`` (images -> CPU feature maps) once over ``source``."""
        chunks: list[list[torch.Tensor]] = []
        for batch in iterate_batches(source, batch_size, threads=1, desc=desc):
            feats = teacher(batch["image"])
            chunks.append([f.to(torch.float16) for f in feats])
        return cls(source, [torch.cat(parts) for parts in zip(*chunks)])


def batch_targets(batch: Mapping[str, Any], count: int, device: torch.device) -> list[torch.Tensor]:
    """The ``count`` teacher feature maps of a batch from :class:`TeacherTargets`, on ``device``."""
    return [batch[f"target{k}"].to(device, non_blocking=True) for k in range(count)]
