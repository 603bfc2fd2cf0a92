"""defectscope: industrial visual anomaly detection.

Fit a detector on images of good parts, then score, localise and judge new images::

    from defectscope import PatchCore, load
    det = PatchCore().fit("path/to/bottle")
    pred = det.predict(images)          # pred.scores (B,), pred.maps (B, H, W), pred.verdicts
    det.save("runs/bottle"); det = load("runs/bottle")
"""

from . import _process  # noqa: F401  (first: sets the threading and allocator policy before torch loads)

__version__ = "0.1.0"

from .methods import (
    DDAD,
    DMAD,
    DRAEM,
    GLAD,
    METHODS,
    MKD,
    SPADE,
    Detector,
    PaDiM,
    ParamSpec,
    PatchCore,
    Prediction,
    ReverseDistillation,
    UninformedStudents,
    load,
)

__all__ = [
    "DDAD",
    "DMAD",
    "DRAEM",
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
    "__version__",
    "load",
]
