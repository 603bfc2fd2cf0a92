"""All detection methods, by the name used on the command line and in saved models."""

from .base import Detector, Prediction, load
from .patchcore import PatchCore

METHODS: dict[str, type[Detector]] = {
    PatchCore.name: PatchCore,
}

__all__ = ["METHODS", "Detector", "PatchCore", "Prediction", "load"]
