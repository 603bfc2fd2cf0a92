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
import torch
from PIL import Image

from ..data.image_io import read_image
from ..errors import DataError
from ..report.images import heat_overlay
from ..report.overlay import colorize, display_max


def png_bytes(img: Image.Image) -> bytes:
    """An image encoded as PNG."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def load_map(path: Path) -> torch.Tensor:
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
    return torch.from_numpy(values)


def overlay_png(image: np.ndarray, amap: np.ndarray, threshold: float | None) -> bytes:
    """The ``predict --heatmaps`` overlay of an (H, W, 3) image and its map (any resolution), as PNG bytes."""
    return png_bytes(heat_overlay(image, amap, threshold))


def stored_overlay_png(
    image_path: Path, map_path: Path, threshold: float | None, roi: tuple[int, int, int, int] | None = None
) -> bytes:
    """The overlay of a logged inspection from its stored files, at the image's own size (its region
    ``roi`` (x, y, w, h) only, for a model with one)."""
    amap = load_map(map_path).numpy()
    img, _ = read_image(image_path)
    try:
        if roi is not None and roi[0] + roi[2] <= img.width and roi[1] + roi[3] <= img.height:
            x, y, w, h = roi
            region = img.crop((x, y, x + w, y + h))
            pixels = np.array(region)
            region.close()
        else:
            pixels = np.array(img)
    finally:
        img.close()
    return overlay_png(pixels, amap, threshold)


def stored_heatmap_png(map_path: Path, threshold: float | None) -> bytes:
    """The anomaly map alone in the overlay's colours and scale, as PNG bytes."""
    amap = load_map(map_path)
    vmax = display_max(threshold, amap)
    return png_bytes(Image.fromarray(colorize(amap.numpy() / max(vmax, 1e-12))))
