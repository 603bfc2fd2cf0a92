"""Engines: what computes a fitted detector's predictions.

``torch`` is the detector's own code. ``onnxruntime`` and ``openvino`` run its exported ONNX graph
(:mod:`defectscope.export`) in place of ``Detector.predict``'s computation; the geometry, the
threshold, the records and every front end stay the same, so a run folder works with each. The
graph is ``RUN/model.onnx`` (``RUN/model.int8.onnx`` with int8) when ``defectscope export`` wrote
it (checked against the run: same tensors, parameters and geometry), else it is exported in memory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DefectscopeError
from ..methods.base import Detector
from ..methods.model_file import read_config

ENGINES = ("torch", "onnxruntime", "openvino")


@dataclass(frozen=True)
class EngineChoice:
    """How to run a detector: the engine, int8 (ONNX engines), and whether the whole graph runs in the
    engine even where the method hands over to torch code (PatchCore's faiss search) by default."""

    name: str = "torch"
    int8: bool = False
    whole_graph: bool = False
    exported: str | None = None  # an exported file to use instead of the run folder's

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise DefectscopeError(f"engine {self.name!r}: use one of {', '.join(ENGINES)}")
        if self.name == "torch" and (self.int8 or self.whole_graph or self.exported):
            raise DefectscopeError("--int8, --whole-graph and --exported need --engine onnxruntime or openvino")


def use_engine(detector: Detector, choice: EngineChoice, run: str | os.PathLike[str] | None = None) -> str | None:
    """Make ``detector`` (loaded from the run folder ``run``) predict with ``choice``; returns a note
    for the user when the graph had to be exported in memory."""
    if choice.name == "torch":
        detector.engine = None
        return None
    require_onnx(f"the {choice.name} engine")
    from ..export.build import export_detector
    from ..export.onnx_file import DEFAULT_NAMES, check_source, read_exported

    tensors_sha = read_config(run)["tensors_sha256"] if run is not None else None
    path = Path(choice.exported) if choice.exported else (Path(run) / DEFAULT_NAMES[choice.int8] if run else None)
    note = None
    if path is not None and (choice.exported or path.exists()):
        exported = read_exported(path)
        check_source(exported, detector, tensors_sha)
        if bool(exported.meta.get("int8")) != choice.int8:
            kind = "an int8" if exported.meta.get("int8") else "a float32"
            raise DefectscopeError(f"{path}: {kind} export; {'pass' if not choice.int8 else 'leave out'} --int8 for it")
    else:
        start = time.perf_counter()
        exported = export_detector(detector, tensors_sha, int8=choice.int8)
        seconds = time.perf_counter() - start
        where = f"no {path.name} in {run}" if path is not None else "no exported file"
        note = f"{where}: exported the graph in memory ({seconds:.1f} s); `defectscope export` saves it"
    engine = _engine_class(choice.name)(exported, detector, choice.whole_graph, torch.get_num_threads())
    size = detector.image_size
    engine.run(torch.zeros(min(detector.batch_size, 16), 3, size, size))  # sizes the runtime's buffers once
    detector.engine = engine
    return note


def engine_facts(detector: Detector) -> dict[str, Any]:
    """What records and reports say about the engine of ``detector``."""
    engine = detector.engine
    if engine is None:
        return {"engine": "torch"}
    describe = getattr(engine, "describe", None)
    return describe() if callable(describe) else {"engine": engine.name}


def require_onnx(what: str) -> None:
    """A one-line error when the ``onnx`` extra (onnx + onnxruntime) is not installed."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise DefectscopeError(f"{what} needs {' and '.join(missing)}: pip install 'defectscope[onnx]'")


def _engine_class(name: str) -> Any:
    try:
        if name == "onnxruntime":
            from .onnxruntime import OnnxRuntimeEngine

            return OnnxRuntimeEngine
        from .openvino import OpenVinoEngine

        return OpenVinoEngine
    except ImportError as exc:
        extra = "onnx" if name == "onnxruntime" else "openvino"
        raise DefectscopeError(
            f"the {name} engine needs {exc.name or 'its packages'}: pip install 'defectscope[{extra}]'"
        ) from None
