"""int8: static quantisation of the pretrained backbone's convolutions, calibrated on good images.

Only the backbone (the graph's ``extractor`` scope) is quantised: the inputs and weights of its full
and pointwise convolutions, per output channel for the weights and per tensor for the inputs (QDQ
format, min-max ranges over the calibration images). Depthwise convolutions and every convolution's
output stay float32, and so does the method's head (bank search, Gaussians, upsampling, blur):
quantising those as well cost PatchCore on bottle 0.013 AUPRO and PaDiM much more (BENCHMARKS.md).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch

from ..data import Sample, iterate_batches
from ..errors import NotExportable
from ..methods.base import Detector
from .graph import INPUT


def backbone_convolutions(model: onnx.ModelProto) -> list[str]:
    """Names of the full and pointwise (not depthwise) Conv nodes of the pretrained backbone (exported
    under an ``extractor`` scope)."""

    def groups(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    return [n.name for n in model.graph.node if n.op_type == "Conv" and "/extractor/" in n.name and groups(n) == 1]


def quantize_backbone(model: onnx.ModelProto, detector: Detector, samples: list[Sample]) -> onnx.ModelProto:
    """``model`` with its backbone quantised to int8, calibrated on the images of ``samples``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    convs = backbone_convolutions(model)
    if not convs:
        raise NotExportable(f"{detector.name}: int8 quantises a pretrained backbone, and this graph has none")
    if not samples:
        raise NotExportable(f"{detector.name}: int8 needs good images to calibrate the quantisation ranges")
    dataset = detector.fit_dataset(samples)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = (
                {INPUT: b["image"].numpy()} for b in iterate_batches(dataset, 8, desc="int8 calibration")
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="defectscope-int8-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, source)
        torch_threads = torch.get_num_threads()
        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=convs,
            op_types_to_quantize=["Conv"],
            extra_options={"OpTypesToExcludeOutputQuantization": ["Conv"]},
        )
        torch.set_num_threads(torch_threads)
        return onnx.load(target)
