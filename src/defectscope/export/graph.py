"""Tracing a fitted detector into an ONNX graph: images in [0, 1] -> scores and maps, dynamic batch."""

from __future__ import annotations

import io
import warnings

import onnx
import torch

from ..errors import NotExportable
from ..methods.base import Detector

OPSET = 17
INPUT, SCORES, MAPS = "images", "scores", "maps"
#: Operator domains a graph may use: the standard ones, which every ONNX runtime implements (no custom code).
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


def to_onnx(detector: Detector) -> onnx.ModelProto:
    """The detector's computation as an ONNX model (no metadata yet): input ``images`` (B, 3, S, S)
    float32 in [0, 1]; outputs ``scores`` (B,) and ``maps`` (B, S, S), and the method's
    ``export_handover`` output where it has one. Runs on the CPU."""
    if not detector.is_fitted:
        raise NotExportable(f"{detector.name}: not fitted, nothing to export")
    device = detector.device
    detector.to("cpu")
    try:
        size = detector.image_size
        example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            detector._predict(example)  # builds networks made on first use, so they export as submodules
        module = detector.export_module().eval()
        buffer = io.BytesIO()
        batch = {0: "batch"}
        outputs = [SCORES, MAPS] + ([detector.export_handover] if detector.export_handover else [])
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on constants and the legacy exporter
            torch.onnx.export(
                module,
                (example,),
                buffer,  # type: ignore[arg-type]  # the exporter writes to any binary file object
                input_names=[INPUT],
                output_names=outputs,
                dynamic_axes={name: batch for name in [INPUT, *outputs]},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        detector.to(device)
    model = onnx.load_from_string(buffer.getvalue())
    foreign = sorted({node.domain for node in model.graph.node} - STANDARD_DOMAINS)
    if foreign:
        raise NotExportable(f"{detector.name}: its graph needs non-standard operators ({', '.join(foreign)})")
    return model
