"""What the ONNX engines share: running an exported graph in place of a detector's ``_predict``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import onnx
import torch
from onnx.utils import Extractor

from ..export.graph import INPUT, MAPS, SCORES
from ..export.onnx_file import Exported
from ..methods.base import Detector, Prediction


class GraphEngine(ABC):
    """Runs an exported graph. With a handover (PatchCore's patch embeddings) and not ``whole_graph``,
    only the graph up to that output runs here and the detector's own torch code does the rest
    (faiss's inverted-file search is several times faster on a CPU than the graph's matrix products)."""

    name: str

    def __init__(self, exported: Exported, detector: Detector, whole_graph: bool, threads: int) -> None:
        self.exported, self.detector, self.threads = exported, detector, threads
        self.int8 = bool(exported.meta.get("int8"))
        handover = exported.meta.get("handover")
        self.handover: str | None = None if whole_graph or not handover else str(handover)
        model = exported.model
        if self.handover is not None:
            model = Extractor(model).extract_model([INPUT], [self.handover])
        self._load(model)

    @abstractmethod
    def _load(self, model: onnx.ModelProto) -> None:
        """Compile ``model`` for this runtime."""

    @abstractmethod
    def _run(self, outputs: list[str], images: np.ndarray) -> list[np.ndarray]:
        """The named outputs for a batch of images (B, 3, S, S) float32."""

    def run(self, images: torch.Tensor) -> Prediction:
        pixels = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        if self.handover is not None:
            (value,) = self._run([self.handover], pixels)
            return self.detector._predict_from_handover(torch.from_numpy(value))
        scores, maps = self._run([SCORES, MAPS], pixels)
        return Prediction(torch.from_numpy(scores), torch.from_numpy(maps))

    def describe(self) -> dict[str, Any]:
        """What records and reports say about this engine."""
        return {
            "engine": self.name,
            "int8": self.int8,
            "graph": "whole"
            if self.handover is None
            else f"up to {self.handover}, then {self.detector.name}'s torch code",
            "exported": self.exported.name,
            "threads": self.threads,
        }
