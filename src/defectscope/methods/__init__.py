"""All detection methods, by the name used on the command line and in saved models."""

from .base import Detector, Prediction, load
from .padim import PaDiM
from .patchcore import PatchCore
from .spade import SPADE

METHODS: dict[str, type[Detector]] = {
    PatchCore.name: PatchCore,
    PaDiM.name: PaDiM,
    SPADE.name: SPADE,
}

__all__ = ["METHODS", "SPADE", "Detector", "PaDiM", "PatchCore", "Prediction", "load"]
