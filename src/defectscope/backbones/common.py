"""Pieces shared by the network families: the stage interface and random initialisation."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn


class Stage(NamedTuple):
    """A run of modules ending where the feature map reaches a new stride.

    Running the stages of a network in order reproduces its feature path; ``name`` ("s2" ...
    "s32") is the layer name a feature extractor exposes for the stage's output.
    """

    name: str
    stride: int
    channels: int
    module: nn.Module


class Backbone(nn.Module):
    """An ImageNet classifier whose feature path can be cut into stride stages."""

    def stages(self) -> list[Stage]:
        """The stages "s2" ... "s32", in order, sharing this network's modules."""
        raise NotImplementedError


def init_weights(model: nn.Module) -> None:
    """He-initialise (fan-in) convolutions and reset batch norms for random-weight networks.

    Fan-in scaling keeps activations near unit scale through the eval-mode network, where the
    default initialisation lets them shrink towards denormal floats (slow and useless features).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
