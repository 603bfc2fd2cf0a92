"""All detection methods, by the name used on the command line and in saved models."""

from .base import Detector, Prediction, load
from .ddad import DDAD
from .dmad import DMAD
from .draem import DRAEM
from .fyd import FYD
from .glad import GLAD
from .mkd import MKD
from .padim import PaDiM
from .params import ParamSpec
from .patchcore import PatchCore
from .reverse_distillation import ReverseDistillation
from .spade import SPADE
from .students import UninformedStudents

METHODS: dict[str, type[Detector]] = {
    PatchCore.name: PatchCore,
    PaDiM.name: PaDiM,
    FYD.name: FYD,
    SPADE.name: SPADE,
    DMAD.name: DMAD,
    ReverseDistillation.name: ReverseDistillation,
    UninformedStudents.name: UninformedStudents,
    MKD.name: MKD,
    DRAEM.name: DRAEM,
    DDAD.name: DDAD,
    GLAD.name: GLAD,
}

__all__ = [
    "DDAD",
    "DMAD",
    "DRAEM",
    "FYD",
    "GLAD",
    "METHODS",
    "MKD",
    "SPADE",
    "Detector",
    "PaDiM",
    "ParamSpec",
    "PatchCore",
    "Prediction",
    "ReverseDistillation",
    "UninformedStudents",
    "load",
]
