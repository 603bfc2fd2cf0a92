"""The OpenVINO engine (optional extra ``defectscope[openvino]``): the exported ONNX graph compiled for the CPU."""

from __future__ import annotations

import io
import threading

import numpy as np
import onnx

from ..errors import DefectscopeError
from .graph_engine import GraphEngine


class OpenVinoEngine(GraphEngine):
    name = "openvino"

    def _load(self, model: onnx.ModelProto) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise DefectscopeError(
                "the openvino engine needs the openvino package: pip install 'defectscope[openvino]'"
            ) from None
        core = ov.Core()
        network = core.read_model(io.BytesIO(model.SerializeToString()))
        config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.compiled = core.compile_model(network, "CPU", config)
        self.outputs = {out.get_any_name(): out for out in self.compiled.outputs}
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request, used by one caller at a time

    def _run(self, outputs: list[str], images: np.ndarray) -> list[np.ndarray]:
        with self.lock:
            result = self.request.infer({0: images})
            return [np.array(result[self.outputs[name]]) for name in outputs]
