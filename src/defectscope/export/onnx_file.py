"""Exported model files: one ONNX graph with what a deployment needs to know in its metadata.

The threshold, the input geometry, the method and its parameters, the defectscope version and the
sha256 of the source model's tensors are metadata (``metadata_props``, keys ``defectscope.*``), never
part of the graph, so re-calibrating a run never needs a new graph. ``defectscope.graph_sha256``
is the sha256 of the serialised graph (weights included): reading a file recomputes it, so a
damaged or edited graph is refused. Reading runs no code: the file is parsed as data, must use
only the standard operator domains, holds no external-data references and passes the ONNX checker.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from .. import __version__
from ..errors import ExportedModelError
from ..methods.base import Detector
from ..outputs import atomic_write, json_text
from .graph import STANDARD_DOMAINS

PREFIX = "defectscope."
FORMAT_VERSION = 1
#: File names ``defectscope export`` writes into a run folder by default, and engines look for.
DEFAULT_NAMES = {False: "model.onnx", True: "model.int8.onnx"}


@dataclass(frozen=True)
class Exported:
    """A checked exported model: the ONNX model and its defectscope metadata (JSON values)."""

    model: onnx.ModelProto
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the in-memory export"


def graph_sha256(model: onnx.ModelProto) -> str:
    """sha256 of the serialised graph (nodes, initializers, inputs and outputs), not of the metadata."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def describe(detector: Detector, tensors_sha256: str | None, int8: bool, handover: str | None) -> dict[str, Any]:
    """The metadata of an export of ``detector`` (whose saved tensors have ``tensors_sha256``)."""
    calibration = detector.calibration
    return {
        "format_version": FORMAT_VERSION,
        "defectscope_version": __version__,
        "method": detector.name,
        "params": detector.get_params(),
        "image_size": detector.image_size,
        "geometry": detector.geometry.to_json(),
        "threshold": None if calibration is None else calibration.threshold,
        "threshold_rule": detector.threshold_rule,
        "source_tensors_sha256": tensors_sha256,
        "int8": int8,
        "handover": handover,
        "inputs": "images: float32 (batch, 3, S, S) RGB in [0, 1], S = image_size; normalisation is in the graph",
        "outputs": "scores: (batch,) anomaly score; maps: (batch, S, S) anomaly map; "
        "anomalous when score > threshold or not finite",
    }


def with_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> onnx.ModelProto:
    """``model`` with ``meta`` (and the graph's sha256) as its ``defectscope.*`` metadata."""
    del model.metadata_props[:]
    values = {**meta, "graph_sha256": graph_sha256(model)}
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = PREFIX + key, json.dumps(value, allow_nan=False)
    model.producer_name, model.producer_version = "defectscope", __version__
    model.doc_string = f"defectscope {meta['method']} detector; metadata keys {PREFIX}*"
    return model


def write_exported(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically (an earlier file there is unchanged on any error)."""
    return atomic_write(path, model.SerializeToString())


def read_exported(source: str | os.PathLike[str] | bytes, name: str | None = None) -> Exported:
    """Parse and check an exported file (or its bytes): one-line :class:`ExportedModelError` otherwise."""
    path = None if isinstance(source, bytes) else Path(source)
    where = name or str(path)
    if path is not None:
        if not path.is_file():
            raise ExportedModelError(f"{where}: no such exported model file")
        data = path.read_bytes()
    else:
        data = source  # type: ignore[assignment]
    if not data:
        raise ExportedModelError(f"{where}: file is empty (0 bytes)")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        raise ExportedModelError(f"{where}: not an ONNX model (the file cannot be parsed)") from None
    props = {p.key[len(PREFIX) :]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    if not props:
        raise ExportedModelError(f"{where}: an ONNX model not exported by defectscope (no {PREFIX}* metadata)")
    try:
        meta = {key: json.loads(value) for key, value in props.items()}
    except json.JSONDecodeError:
        raise ExportedModelError(f"{where}: its {PREFIX}* metadata is not valid JSON") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportedModelError(
            f"{where}: export format version {meta.get('format_version')!r}, this defectscope reads {FORMAT_VERSION}"
        )
    _check_safe(model, where)
    if graph_sha256(model) != meta.get("graph_sha256"):
        raise ExportedModelError(
            f"{where}: the graph is damaged or was modified (its sha256 differs from the recorded one)"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise ExportedModelError(f"{where}: not a valid ONNX graph ({first})") from None
    return Exported(model, meta, path)


def _check_safe(model: onnx.ModelProto, where: str) -> None:
    """Refuse what would make a runtime load code or other files: custom domains, functions, external data."""
    domains = {op.domain for op in model.opset_import} | {node.domain for node in model.graph.node}
    foreign = sorted(domains - STANDARD_DOMAINS)
    if foreign or len(model.functions):
        what = ", ".join(foreign) or "model-local functions"
        raise ExportedModelError(
            f"{where}: uses custom operators ({what}); defectscope runs only standard ONNX operators"
        )
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportedModelError(f"{where}: refers to external data files; defectscope exports are self-contained")


def check_source(exported: Exported, detector: Detector, tensors_sha256: str | None) -> None:
    """Refuse an export that was not made from ``detector`` (other tensors, method or parameters)."""
    meta = exported.meta
    if meta.get("method") != detector.name:
        raise ExportedModelError(
            f"{exported.name}: exported from a {meta.get('method')} model, not this {detector.name} run"
        )
    if tensors_sha256 is not None and meta.get("source_tensors_sha256") != tensors_sha256:
        raise ExportedModelError(
            f"{exported.name}: exported from another model than this run's (its source sha256 differs); "
            "export the run again (`defectscope export RUN --overwrite`)"
        )
    ours = json.loads(json_text(detector.get_params()))
    theirs = meta.get("params", {})
    differ = sorted(k for k in ours if k not in _NOT_IN_GRAPH and ours.get(k) != theirs.get(k))
    if differ:
        raise ExportedModelError(f"{exported.name}: exported with other parameters ({', '.join(differ)}) than this run")
    if meta.get("geometry") != detector.geometry.to_json():
        raise ExportedModelError(f"{exported.name}: exported with another input geometry than this run")


#: Parameters that change the threshold or the batching, not the graph.
_NOT_IN_GRAPH = frozenset(
    {
        "batch_size",
        "calibration_fraction",
        "threshold_rule",
        "false_alarm_rate",
        "false_alarm_confidence",
        "target_recall",
        "threshold_sigmas",
    }
)
