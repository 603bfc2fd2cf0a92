"""Exporting a fitted detector: trace, optionally quantise, attach metadata, check the result."""

from __future__ import annotations

from ..data import Sample
from ..data.sources import training_samples
from ..errors import DefectscopeError
from ..methods.base import Detector
from .graph import to_onnx
from .onnx_file import Exported, describe, read_exported, with_metadata

#: Good images the int8 quantisation ranges are calibrated on, unless told otherwise.
INT8_CALIBRATION_IMAGES = 32


def export_detector(
    detector: Detector, tensors_sha256: str | None, *, int8: bool = False, calibration: list[Sample] | None = None
) -> Exported:
    """``detector`` as a checked :class:`Exported` model (read back as any file would be)."""
    model = to_onnx(detector)
    if int8:
        from .quantize import quantize_backbone

        model = quantize_backbone(model, detector, calibration if calibration is not None else int8_samples(detector))
    model = with_metadata(model, describe(detector, tensors_sha256, int8, detector.export_handover))
    return read_exported(model.SerializeToString(), name=f"the {detector.name} export")


def int8_samples(detector: Detector, count: int = INT8_CALIBRATION_IMAGES) -> list[Sample]:
    """``count`` good training images of the run, spread over them, to calibrate int8 ranges."""
    info = detector.run_info or {}
    data = info.get("data") or []
    if not data:
        raise DefectscopeError(
            f"{detector.name}: the model does not record its training images; give good images to calibrate int8 on"
        )
    samples = [s for folder in data for s in training_samples(folder)]
    step = max(1, len(samples) // count)
    return samples[::step][:count]
