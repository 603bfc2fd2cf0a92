"""The images of a test report, written in background threads while the model scores the next ones.

Per image, named by :func:`.overlay.unique_names`, ``overlays/`` holds:

- ``<name>.jpg``: the card's thumbnail, the anomaly map over the input in the image's true aspect
  ratio, reduced by a whole factor to a long side of at most :data:`THUMBNAIL` pixels;
- ``full/<name>.jpg``: that overlay at the native resolution, the map upsampled to it;
- ``inputs/<name>.jpg``: the input at the native resolution;
- ``reconstructions/<name>.jpg``: the model's reconstruction at the working resolution, for
  reconstruction methods only.

The map is coloured on the scale of :func:`.overlay.display_max` and the ground truth outlined in
green. Everything goes to a new hidden folder that :meth:`ReportImages.commit` puts in place of
``overlays/`` at the end, so a test that fails half-way leaves the earlier images as they were.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import OutputError
from ..geometry.inspect import Inspected
from ..outputs import atomic_write, make_folder
from .overlay import colorize, display_max, unique_names

#: Long side of a card's thumbnail, in pixels (smaller images keep their size).
THUMBNAIL = 320
#: Weight of the colours over the input.
ALPHA = 0.45
OUTLINE_GREEN = (0, 255, 0)
#: The colour ramp as a 256-entry palette: map levels 0..255 -> RGB.
_PALETTE = colorize(np.linspace(0.0, 1.0, 256)).reshape(-1).tolist()


def viewer_files(overlay: str) -> dict[str, str]:
    """The viewer's files of a card whose thumbnail is ``overlay`` (``overlays/<name>.jpg``)."""
    path = PurePosixPath(overlay)
    return {kind: str(path.parent / kind / path.name) for kind in ("full", "inputs", "reconstructions")}


def _levels(amap: np.ndarray, vmax: float) -> Image.Image:
    """The map on the colour scale [0, vmax] as an 8-bit image (NaN as 0, above the scale as its top)."""
    scaled = np.nan_to_num(np.asarray(amap, dtype=np.float32) / np.float32(vmax), nan=0.0, posinf=1.0, neginf=0.0)
    return Image.fromarray((np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def mask_outline(mask: np.ndarray, width: int) -> tuple[Image.Image, tuple[int, int, int, int]] | None:
    """The ground truth's edge, ``width`` pixels wide on the inside, over the mask's bounding box
    (and the box); None without a defect."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    # One pixel of margin around the box: outside the mask, so the edge is found as on the whole image.
    y0, y1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, mask.shape[0])
    x0, x1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, mask.shape[1])
    box = mask[y0:y1, x0:x1]
    edge = box & ~ndimage.minimum_filter(box, size=2 * width + 1, mode="nearest")
    return Image.fromarray(edge.astype(np.uint8) * 255), (x0, y0, x1, y1)


def compose(base: Image.Image, levels: Image.Image, mask: np.ndarray | None) -> Image.Image:
    """The overlay at the size of ``base`` (the input, RGB): the coloured map levels resized to it
    and blended over it, the mask's edge in green (wider on large images, so it stays visible when
    the browser scales them down)."""
    heat = levels.resize(base.size, Image.Resampling.BILINEAR)
    heat.putpalette(_PALETTE)
    out = Image.blend(base, heat.convert("RGB"), ALPHA)
    if mask is not None:
        if mask.shape != (base.height, base.width):
            mask = np.asarray(Image.fromarray(mask).resize(base.size, Image.Resampling.NEAREST))
        edge = mask_outline(mask, max(2, round(max(base.size) / 400)))
        if edge is not None:
            out.paste(OUTLINE_GREEN, edge[1], mask=edge[0])
    return out


def jpeg_bytes(image: Image.Image, quality: int, subsampling: int = 0) -> bytes:
    """JPEG bytes; ``subsampling`` 0 (4:4:4) keeps thin coloured lines sharp, 2 (4:2:0) suits photos."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()


def _rgb(pixels: np.ndarray) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def map_scale(threshold: float | None, amap: np.ndarray) -> float:
    """Top of the colour scale (:func:`.overlay.display_max`), finite and positive whatever the map holds."""
    vmax = display_max(threshold, amap)
    if not np.isfinite(vmax):  # a map with NaN or inf values: the top of its finite ones
        finite = amap[np.isfinite(amap)]
        vmax = float(finite.max()) if finite.size else 1.0
    return vmax if vmax > 0 else 1.0


def heat_overlay(
    image: np.ndarray, amap: np.ndarray, threshold: float | None, mask: np.ndarray | None = None
) -> Image.Image:
    """The overlay of ``amap`` (any resolution, upsampled) over the (H, W, 3) ``image`` at its own size,
    ``mask`` outlined in green: what the report's viewer, ``predict --heatmaps`` and the service show."""
    return compose(_rgb(image), _levels(amap, map_scale(threshold, amap)), mask)


class ReportImages:
    """Writes a test's images into a new hidden folder that :meth:`commit` puts in place of
    ``folder/overlays``; ``threads`` threads encode and write them (0: in the calling thread).

    :meth:`add` returns at once while few images are waiting, and waits for the writers otherwise,
    so at most about two images per thread are held in memory.
    """

    def __init__(self, folder: Path, paths: list[str], threshold: float | None, threads: int = 2) -> None:
        self.final = Path(folder) / "overlays"
        self.root = make_folder(Path(folder) / f".overlays.{uuid.uuid4().hex[:12]}.tmp", "report images")
        for sub in ("full", "inputs"):
            make_folder(self.root / sub, "report images")
        self.threshold = threshold
        self._names: dict[str, deque[str]] = {}
        for path, name in zip(paths, unique_names(paths)):
            self._names.setdefault(path, deque()).append(name)
        self._with_reconstructions = False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="report-images") if threads > 0 else None
        self._room = threading.BoundedSemaphore(2 * max(threads, 1))
        self._error: OutputError | None = None
        self._lock = threading.Lock()
        self._open = True

    @property
    def with_reconstructions(self) -> bool:
        """Whether any image came with a reconstruction (a reconstruction method)."""
        return self._with_reconstructions

    def add(self, item: Inspected) -> str:
        """Queue the images of ``item``; returns its card's overlay path, relative to the folder."""
        if not self._open:
            raise RuntimeError("ReportImages: add() after commit() or discard()")
        self._raise_error()
        waiting = self._names.get(item.path)
        if not waiting:
            raise ValueError(f"{item.path}: not among the paths this report was made for (or added twice)")
        if item.image is None:
            raise ValueError(f"{item.path}: the report needs the image's native pixels")
        name = waiting.popleft()
        if item.reconstruction is not None and not self._with_reconstructions:
            make_folder(self.root / "reconstructions", "report images")
            self._with_reconstructions = True
        vmax = map_scale(self.threshold, item.map)
        job = (name, item.path, item.image, item.map, vmax, item.mask, item.reconstruction)
        if self._pool is None:
            self._run(*job)
        else:
            self._room.acquire()
            self._pool.submit(self._run, *job).add_done_callback(lambda _: self._room.release())
        return f"overlays/{name}.jpg"

    def _run(
        self,
        name: str,
        path: str,
        image: np.ndarray,
        amap: np.ndarray,
        vmax: float,
        mask: np.ndarray | None,
        reconstruction: np.ndarray | None,
    ) -> None:
        """Encode and write one image's files; the first error is kept for :meth:`commit`."""
        if self._error is not None:
            return
        try:
            rgb = _rgb(image)
            levels = _levels(amap, vmax)
            native = None if mask is None else np.asarray(mask, dtype=bool)
            factor = -(-max(rgb.size) // THUMBNAIL)  # the thumbnail: reduced by a whole factor (box filter)
            thumbnail = compose(rgb.reduce(factor) if factor > 1 else rgb, levels, native)
            atomic_write(self.root / f"{name}.jpg", jpeg_bytes(thumbnail, 85))
            atomic_write(self.root / "full" / f"{name}.jpg", jpeg_bytes(compose(rgb, levels, native), 90))
            atomic_write(self.root / "inputs" / f"{name}.jpg", jpeg_bytes(rgb, 90, subsampling=2))
            if reconstruction is not None:
                atomic_write(self.root / "reconstructions" / f"{name}.jpg", jpeg_bytes(_rgb(reconstruction), 90, 2))
        except Exception as exc:
            error = (
                exc if isinstance(exc, OutputError) else OutputError(f"{path}: cannot write its report images ({exc})")
            )
            if error is not exc:
                error.__cause__ = exc
            with self._lock:
                self._error = self._error or error
        if self._pool is None:
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._open = False

    def commit(self) -> None:
        """Wait for every write, then replace the earlier overlays folder (if any) by the new one;
        the first write error is raised (as an :class:`OutputError`) and the earlier folder kept."""
        self._wait()
        self._raise_error()
        old = self.root.with_suffix(".old")
        try:
            if self.final.exists() or self.final.is_symlink():
                os.replace(self.final, old)
            os.replace(self.root, self.final)
        except OSError as exc:
            if old.exists() and not self.final.exists():
                os.replace(old, self.final)
            raise OutputError(f"{self.final}: cannot replace ({exc.strerror}); the earlier overlays are kept") from None
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Stop writing and remove the new images if they were not committed (a no-op after a commit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._open = False
        shutil.rmtree(self.root, ignore_errors=True)
