"""Pixel-level inputs: masks and maps stacked as ``(N, H, W)`` arrays, or one 2-D array per image.

Images of different sizes (maps evaluated at each image's native resolution) come as sequences:
each mask has the shape of its own map, shapes may differ between images. Either form is
validated without copying bool masks or float32/float64 maps, and every pixel metric gives the
same result for both when the shapes agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import numpy as np

from .ranking import as_binary, as_scores

#: Masks or maps: one ``(N, H, W)`` array, or a list of N 2-D arrays.
Pixels = np.ndarray | list[np.ndarray]


def check_masks_maps(masks: object, maps: object) -> tuple[Pixels, Pixels]:
    """Validate binary masks and real maps, stacked (both numeric arrays) or per image (otherwise)."""
    if _numeric_array(masks) and _numeric_array(maps):
        return _check_stacked(cast(np.ndarray, masks), cast(np.ndarray, maps))
    return _check_per_image(masks, maps)


def _numeric_array(x: object) -> bool:
    return isinstance(x, np.ndarray) and x.dtype != object  # an object array holds one image per item


def _check_stacked(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = as_binary(masks, "masks")
    a = as_scores(maps, "maps")
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(f"masks and maps must be (N, H, W) arrays, got shapes {m.shape} and {a.shape}")
    if m.shape != a.shape:
        raise ValueError(f"masks and maps differ in shape: {m.shape} vs {a.shape}")
    if m.size == 0:
        raise ValueError(f"masks and maps are empty (shape {m.shape})")
    return m, a


def _check_per_image(masks: object, maps: object) -> tuple[list[np.ndarray], list[np.ndarray]]:
    try:
        mask_list, map_list = list(cast(Iterable[Any], masks)), list(cast(Iterable[Any], maps))
    except TypeError:
        raise ValueError("masks and maps must be (N, H, W) arrays or sequences of 2-D arrays") from None
    if len(mask_list) != len(map_list):
        raise ValueError(f"{len(mask_list)} masks but {len(map_list)} maps")
    if not mask_list:
        raise ValueError("masks and maps are empty (no image)")
    for i, (mask, amap) in enumerate(zip(mask_list, map_list)):
        m, a = as_binary(mask, f"masks[{i}]"), as_scores(amap, f"maps[{i}]")
        mask_list[i], map_list[i] = m, a
        if m.ndim != 2 or a.ndim != 2:
            raise ValueError(f"mask and map of image {i} must be 2-D, got shapes {m.shape} and {a.shape}")
        if m.shape != a.shape:
            raise ValueError(f"mask and map of image {i} differ in shape: {m.shape} vs {a.shape}")
        if m.size == 0:
            raise ValueError(f"mask and map of image {i} are empty (shape {m.shape})")
    return mask_list, map_list


def count_pixels(masks: Pixels) -> tuple[int, int]:
    """Anomalous and normal pixel counts of validated masks."""
    if isinstance(masks, np.ndarray):
        n_pos, n_all = int(np.count_nonzero(masks)), masks.size
    else:
        n_pos, n_all = sum(int(np.count_nonzero(m)) for m in masks), sum(m.size for m in masks)
    return n_pos, n_all - n_pos


def image_flags(masks: Pixels, maps: Pixels) -> tuple[np.ndarray, np.ndarray]:
    """Per image of validated inputs: whether its mask has an anomalous pixel, whether its map is finite."""
    marked = np.array([m.any() for m in masks], dtype=bool)
    # min and max are NaN when any value is, and read every value without a temporary array.
    finite = np.array([np.isfinite(a.min()) and np.isfinite(a.max()) for a in maps], dtype=bool)
    return marked, finite
