"""The served models: each fitted run loaded once, under a URL-safe name, with its decode-predict-log pipeline.

One image goes ``bytes -> decoded RGB (the CLI's limits) -> views under the model's geometry ->
batched predict -> Record -> stored image + map -> logged inspection``. Decoding is the CLI's
(:func:`read_image_bytes` and :func:`~defectscope.geometry.sources.open_image`, as ``predict``
reads a file) and the verdict
is the run layer's (:meth:`Record.of`), so the service and ``defectscope predict`` agree on every image.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..data.image_io import read_image_bytes
from ..engines import EngineChoice, engine_facts
from ..errors import DefectscopeError, ModelFileError
from ..geometry.inspect import assemble
from ..geometry.sources import open_image
from ..geometry.views import Assembler, Views
from ..methods import Detector, Prediction
from ..methods.model_file import CONFIG_FILE, TENSORS_FILE
from ..progress import Log, quiet
from ..records import Record
from ..runs import RunInfo, run_info
from ..runs.info import load_with_engine

if TYPE_CHECKING:
    from .store import Inspection, InspectionLog

#: What a model name may look like: it is a URL path segment and a label in metrics.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Formats stored as the bytes that were sent, by their leading bytes; anything else Pillow reads
# (GIF, PPM, ...) is stored as a lossless PNG of the decoded pixels.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


def clean_filename(name: str | None) -> str | None:
    """The base name of a client's file name, printable characters only, at most 255; None if nothing is left."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable())[:255].strip()
    return base or None


def _stored_suffix(data: bytes) -> str | None:
    """The suffix the sent bytes are stored under, or None where they must be re-encoded."""
    for signature, suffix in _SIGNATURES:
        if data.startswith(signature):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def _sha256_run(folder: Path) -> tuple[str, str]:
    """sha256 of ``config.json``'s bytes followed by ``model.safetensors``' bytes, and of the tensors alone."""
    combined = hashlib.sha256()
    tensors = hashlib.sha256()
    combined.update((folder / CONFIG_FILE).read_bytes())
    with open(folder / TENSORS_FILE, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            combined.update(chunk)
            tensors.update(chunk)
    return combined.hexdigest(), tensors.hexdigest()


@dataclass
class Decoded:
    """An upload ready for the model: its views under the model's geometry, and the bytes to store under ``suffix``."""

    views: Views
    data: bytes
    suffix: str
    filename: str | None
    decode_ms: float
    image: np.ndarray | None = None  # (H, W, 3) uint8 native pixels of the region, when asked for


class ServedModel:
    """A fitted run loaded for serving: its name, folder, detector and sha256.

    ``lock`` serialises calls into the detector (the micro-batcher's worker, a folder watcher).
    """

    def __init__(self, name: str, run: Path, detector: Detector, sha256: str) -> None:
        self.name = name
        self.run = run
        self.detector = detector
        self.sha256 = sha256
        self.info: RunInfo | None = run_info(detector)
        self.lock = threading.Lock()

    @classmethod
    def load(
        cls,
        run: str | Path,
        name: str | None = None,
        device: str = "cpu",
        engine: EngineChoice | None = None,
        log: Log = quiet,
    ) -> ServedModel:
        """Load a run folder, predicting with ``engine`` (default torch); the name defaults to the folder's
        name and must match :data:`NAME_PATTERN`."""
        folder = Path(run).expanduser()
        name = folder.resolve().name if name is None else name
        if not NAME_PATTERN.fullmatch(name):
            raise DefectscopeError(
                f"{run}: {name!r} cannot be a model name (letters, digits, '.', '_', '-'; at most 64, "
                "starting with a letter or digit); name it with RUN=NAME"
            )
        if not folder.is_dir():
            raise ModelFileError(f"{folder}: run folder not found")
        detector = load_with_engine(folder, device, engine, log)
        try:
            sha256, tensors_sha256 = _sha256_run(folder)
            stored = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("tensors_sha256")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelFileError(f"{folder}: cannot be read for its checksum ({exc})") from None
        if stored != tensors_sha256:
            raise ModelFileError(f"{folder}: the run changed while it was being loaded; start again")
        return cls(name, folder, detector, sha256)

    # -- what the model says about itself ---------------------------------------------------------
    @property
    def threshold(self) -> float | None:
        return self.detector.calibration.threshold if self.detector.calibration else None

    @property
    def rule(self) -> str | None:
        return self.detector.calibration.rule if self.detector.calibration else None

    @property
    def image_size(self) -> int:
        return self.detector.image_size

    @property
    def categories(self) -> list[str]:
        return list(self.info.categories) if self.info else []

    def describe(self) -> dict[str, Any]:
        """The ``GET /v1/models`` entry, without the feedback counts."""
        calibration = self.detector.calibration
        return {
            "name": self.name,
            "method": self.detector.name,
            "sha256": self.sha256,
            "threshold": self.threshold,
            "rule": self.rule,
            "image_size": self.image_size,
            "geometry": self.detector.geometry.to_json(),
            "categories": self.categories,
            "false_alarm_bound": calibration.false_alarm_bound if calibration else None,
            "engine": engine_facts(self.detector),
        }

    # -- the pipeline, one step at a time (the service runs each where it belongs) ------------------
    def decode(self, data: bytes, filename: str | None, native: bool = False) -> Decoded:
        """Bytes -> the model's views, with the CLI's limits; a one-line DataError names ``filename``.

        With ``native`` the region's native pixels come too (for an overlay)."""
        started = time.perf_counter()
        filename = clean_filename(filename)
        name = filename or "upload"
        suffix = _stored_suffix(data)
        png: list[bytes] = []

        def read(draft: int | None) -> tuple[Image.Image, tuple[int, int]]:
            img, full = read_image_bytes(data, name, draft_to=draft)
            if suffix is None and not png:  # a format we keep as the pixels that were scored
                buffer = io.BytesIO()
                img.save(buffer, format="PNG")
                png.append(buffer.getvalue())
            return img, full

        views, pixels, _ = open_image(read, name, self.detector.geometry, self.image_size, native)
        stored, stored_suffix = (png[0], ".png") if suffix is None else (data, suffix)
        return Decoded(views, stored, stored_suffix, filename, (time.perf_counter() - started) * 1000.0, pixels)

    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a (B, 3, H, W) batch of views; one call into the detector at a time."""
        with self.lock:
            return self.detector.predict(images)

    def score(self, items: Sequence[Decoded]) -> list[tuple[float, np.ndarray]]:
        """Score and map (at the working resolution) of each decoded image, their views batched together."""
        done = assemble(self.predict, self.detector.batch_size, [(i, d.views) for i, d in enumerate(items)])
        return [(result.score, result.map) for result in done]

    @staticmethod
    def finish(views: Views, score: float, amap: torch.Tensor) -> tuple[float, np.ndarray]:
        """Score and map of a one-view image scored elsewhere (the micro-batcher), as the geometry puts them back."""
        assembler = Assembler(views)
        assembler.add(torch.tensor([score]), amap[None], None)
        image_score, image_map, _ = assembler.result()
        return image_score, image_map

    def warm_up(self) -> None:
        """One prediction on a blank image, so the first request does not pay for lazy set-up (about 2x)."""
        self.predict(torch.zeros(1, 3, self.image_size, self.image_size))

    def describe_geometry(self) -> str:
        return self.detector.geometry.describe(self.image_size)

    def record(
        self,
        decoded: Decoded,
        score: float,
        amap: np.ndarray,
        log: InspectionLog,
        timings: dict[str, float],
        started: float,
    ) -> Inspection:
        """Judge one scored image, store its image and map, and log it (committed before this returns).

        ``timings`` are the steps so far (ms); ``started`` the ``time.perf_counter()`` the request began.
        """
        from .store import InspectionIn

        category = self.categories[0] if len(self.categories) == 1 else None
        rec = Record.of(
            decoded.filename or "",
            category,
            score,
            float(amap.max()),
            self.threshold,
            rule=self.rule,
            engine=self.detector.engine_name,
        )
        begin = time.perf_counter()
        image_name = log.store_file(decoded.data, decoded.suffix)
        buffer = io.BytesIO()
        np.save(buffer, amap.astype(np.float16), allow_pickle=False)
        map_name = log.store_file(buffer.getvalue(), ".npy")
        now = time.perf_counter()
        row = InspectionIn(
            model=self.name,
            model_sha256=self.sha256,
            filename=decoded.filename,
            image=image_name,
            map=map_name,
            score=rec.score,
            normalized_score=rec.normalized_score,
            verdict=rec.verdict or "none",  # the log's word for "no threshold, no verdict"
            threshold=rec.threshold,
            rule=rec.rule,
            max_pixel_score=rec.max_pixel_score,
            reason=rec.reason,
            timings={**timings, "store_ms": (now - begin) * 1000.0, "total_ms": (now - started) * 1000.0},
        )
        return log.add_inspection(row)

    def inspect(self, data: bytes, filename: str | None, log: InspectionLog) -> Inspection:
        """The whole pipeline for one image, in the calling thread (a folder watcher; the service batches)."""
        started = time.perf_counter()
        decoded = self.decode(data, filename)
        begin = time.perf_counter()
        [(score, amap)] = self.score([decoded])
        model_ms = (time.perf_counter() - begin) * 1000.0
        timings = {"decode_ms": decoded.decode_ms, "queue_ms": 0.0, "model_ms": model_ms}
        return self.record(decoded, score, amap, log, timings, started)


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """``RUN`` or ``RUN=NAME`` -> (run folder, name or None). A folder whose own name holds '=' stays whole."""
    if "=" in spec and not Path(spec).expanduser().is_dir():
        run, name = spec.rsplit("=", 1)
        if not run:
            raise DefectscopeError(f"{spec!r}: expected RUN or RUN=NAME")
        return Path(run), name
    return Path(spec), None


class ModelRegistry:
    """The models one service serves, by name (distinct, URL-safe)."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise DefectscopeError("name at least one run folder to serve")
        self._models: dict[str, ServedModel] = {}
        for model in models:
            other = self._models.get(model.name)
            if other is not None:
                raise DefectscopeError(
                    f"{model.run}: the name {model.name!r} is already taken by {other.run}; name one with RUN=NAME"
                )
            self._models[model.name] = model

    @classmethod
    def from_specs(
        cls, specs: Sequence[str], device: str = "cpu", engine: EngineChoice | None = None, log: Log = quiet
    ) -> ModelRegistry:
        """Load every ``RUN`` or ``RUN=NAME``; names are checked before any model is loaded."""
        parsed = [parse_spec(spec) for spec in specs]
        names = [name if name is not None else run.expanduser().resolve().name for run, name in parsed]
        seen: dict[str, str] = {}
        for spec, name in zip(specs, names):
            if name in seen:
                raise DefectscopeError(
                    f"{spec}: the name {name!r} is already taken by {seen[name]}; name one with RUN=NAME"
                )
            seen[name] = spec
        return cls([ServedModel.load(run, name, device, engine, log) for (run, _), name in zip(parsed, names)])

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)
