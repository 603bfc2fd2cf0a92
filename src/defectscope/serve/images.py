"""Heat-map PNGs of logged inspections, from the stored input image and the stored anomaly map.

The overlay is drawn exactly as ``defectscope predict --heatmaps`` draws it
(:func:`defectscope.report.overlay.overlay` with :func:`display_max`): the input resized to the
model's input size as the model saw it, the map coloured on a scale up to 1.5 x the threshold.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.image_io import image_to_tensor, read_image
from ..errors import DataError
from ..report.overlay import colorize, display_max, overlay


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


def model_input(image_path: Path, size: tuple[int, int]) -> torch.Tensor:
    """The stored input as the model saw it: (3, H, W) in [0, 1], read and resized as the CLI reads files."""
    img, _ = read_image(image_path, draft_to=max(size))
    try:
        return image_to_tensor(img, size)
    finally:
        img.close()


def overlay_png(image: torch.Tensor, amap: torch.Tensor, threshold: float | None) -> bytes:
    """The ``predict --heatmaps`` overlay of a (3, H, W) image and its (H, W) map, as PNG bytes."""
    return png_bytes(overlay(image, amap, display_max(threshold, amap)))


def stored_overlay_png(image_path: Path, map_path: Path, threshold: float | None) -> bytes:
    """The overlay of a logged inspection, from its stored files."""
    amap = load_map(map_path)
    size = (int(amap.shape[0]), int(amap.shape[1]))
    return overlay_png(model_input(image_path, size), amap, threshold)


def stored_heatmap_png(map_path: Path, threshold: float | None) -> bytes:
    """The anomaly map alone in the overlay's colours and scale, as PNG bytes."""
    amap = load_map(map_path)
    vmax = display_max(threshold, amap)
    return png_bytes(Image.fromarray(colorize(amap.numpy() / max(vmax, 1e-12))))
