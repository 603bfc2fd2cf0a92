"""The ONNX Runtime engine: graph optimisations on, intra-op threads as torch's, no busy-waiting, no memory
patterns (batch shapes vary)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from .graph_engine import GraphEngine


class OnnxRuntimeEngine(GraphEngine):
    name = "onnxruntime"

    def _load(self, model: onnx.ModelProto) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # no memory-pattern planning: it is redone for every new batch shape (the last, short batch of a
        # test set, tiles of another image size) and cost 13 % of PatchCore's end-to-end test pass on bottle
        options.enable_mem_pattern = False
        # the decode threads share the cores: idle ORT threads sleep instead of spinning
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        cuda = self.detector.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)

    def _run(self, outputs: list[str], images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(outputs, {self.session.get_inputs()[0].name: images})
