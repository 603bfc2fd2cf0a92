"""int8: static quantisation of the pretrained backbone's deepest stages, calibrated on good images.

The convolutions of the backbone's two deepest stages in the graph (for the default layers s8 and
s16 of efficientnet_lite0: the stages that produce them) are quantised to int8: weights per output
channel, activations per tensor with min-max ranges over the calibration images, as fused int8
operators (QLinearConv). The earlier, high-resolution stages and the method's head (bank search,
Gaussians, upsampling, blur) stay float32. Measured on PatchCore bottle (BENCHMARKS.md): quantising
every stage cost 0.014 pixel AUROC and 0.07 AUPRO; the early stages alone cost as much; the two
deepest alone change image / pixel AUROC by less than 0.001.
"""

from __future__ import annotations

import logging
import re
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
    """Names of the Conv nodes of the two deepest backbone stages in the graph (the backbone is exported
    under an ``extractor`` scope, its stages as ``stages.N``)."""
    stage_of = {}
    for node in model.graph.node:
        found = re.search(r"/extractor/stages\.(\d+)/", node.name)
        if node.op_type == "Conv" and found:
            stage_of[node.name] = int(found.group(1))
    if not stage_of:
        return []
    deepest = max(stage_of.values())
    return [name for name, stage in stage_of.items() if stage >= deepest - 1]


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
        logging.disable(logging.WARNING)  # onnxruntime's advice to pre-process (it is about its own examples)
        try:
            quantize_static(
                str(source),
                str(target),
                Reader(),
                quant_format=QuantFormat.QOperator,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                nodes_to_quantize=convs,
                op_types_to_quantize=["Conv"],
            )
        finally:
            logging.disable(logging.NOTSET)
        torch.set_num_threads(torch_threads)
        return onnx.load(target)
