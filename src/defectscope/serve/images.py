"""Heat-map PNGs of logged inspections, from the stored input image and the stored anomaly map.

The overlay is the one ``defectscope predict --heatmaps`` writes (:func:`heat_overlay`): the input
(its region of interest, for a model with one) at its own size, the stored map (at the model's
working resolution, see :mod:`defectscope.geometry`) upsampled over it and coloured on a scale up to
1.5 x the threshold.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.image_io import read_image
from ..errors import DataError
from ..geometry import Geometry
from ..geometry.views import crop_region
from ..report.images import heat_overlay
from ..report.overlay import colorize, display_max


def png_bytes(img: Image.Image) -> bytes:
    """An image encoded as PNG."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def load_map(path: Path) -> np.ndarray:
    """A stored anomaly map (``.npy``, float16 (H, W)) as float32; non-finite values read as the map's top."""
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path.name}: stored anomaly map cannot be read ({exc})") from None
    if values.ndim != 2 or values.dtype.kind != "f":
        raise DataError(f"{path.name}: stored anomaly map is not a 2-D float array")
    values = values.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():  # an image judged "error": show the unusable pixels as hot, never as cold
        top = float(values[finite].max()) if finite.any() else 1.0
        values = np.where(finite, values, top)
    return values


def overlay_png(image: np.ndarray, amap: np.ndarray, threshold: float | None) -> bytes:
    """The ``predict --heatmaps`` overlay of an (H, W, 3) image and its map (any resolution), as PNG bytes."""
    return png_bytes(heat_overlay(image, amap, threshold))


def stored_overlay_png(image_path: Path, map_path: Path, threshold: float | None, geometry: Geometry) -> bytes:
    """The overlay of a logged inspection from its stored files, at the image's own size (its region
    of interest only, for a model ``geometry`` with one)."""
    amap = load_map(map_path)
    img, _ = read_image(image_path)
    try:
        region = crop_region(img, geometry, image_path.name)
        pixels = np.array(region)
    finally:
        img.close()
    return overlay_png(pixels, amap, threshold)


def stored_heatmap_png(map_path: Path, threshold: float | None) -> bytes:
    """The anomaly map alone in the overlay's colours and scale, as PNG bytes."""
    amap = load_map(map_path)
    vmax = display_max(threshold, amap)
    return png_bytes(Image.fromarray(colorize(amap / max(vmax, 1e-12))))
