"""defectscope: industrial visual anomaly detection.

Fit a detector on images of good parts, then score, localise and judge new images::

    from defectscope import PatchCore, load
    det = PatchCore().fit("path/to/bottle")
    pred = det.predict(images)          # pred.scores (B,), pred.maps (B, H, W), pred.verdicts
    det.save("runs/bottle"); det = load("runs/bottle")
"""

import os

# Idle OpenMP threads sleep instead of spinning. Read once when torch loads, so it is set before
# the first torch import; spinning threads of small training steps cost many times the CPU time of
# the work itself whenever the CPU is shared with other jobs. Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
