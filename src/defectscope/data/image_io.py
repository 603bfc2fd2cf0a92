"""Robust image and mask reading, and conversion to resized tensors.

Every reader turns whatever Pillow can open (any colour mode, 16-bit, EXIF-rotated JPEGs) into
one predictable form, and turns every unusable file into a one-line :class:`DataError` naming it.
"""

from __future__ import annotations

import os
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from defectscope.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

Size = int | tuple[int, int]

# JPEGs are decoded at a reduced DCT scale only while both sides stay at least this many times the
# target size: measured on MVTec bottle, the resized result then differs from a full decode by at
# most about 1/255 (mean 0.05/255), while decoding a 2700 px JPEG for a 256 px target is ~4x faster.
_DRAFT_MARGIN = 3

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_GREY_MASK_MODES = frozenset({"1", "L", "I", "F"}) | _SIXTEEN_BIT_MODES


def _open(path: Path, what: str, draft_to: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Open, fully decode and EXIF-orient one file, or raise a DataError naming it.

    Returns the image and its full oriented (W, H): with ``draft_to`` a JPEG may be decoded at a
    reduced DCT scale, keeping both sides at least ``_DRAFT_MARGIN * draft_to``.
    """
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} path is not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: {what} file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            full_size = img.size
            if draft_to is not None and img.format == "JPEG":
                side = _DRAFT_MARGIN * draft_to
                img.draft(img.mode, (side, side))
            img.load()
            stored_size = img.size
            ImageOps.exif_transpose(img, in_place=True)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: {what} is too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from None
    if img.size != stored_size:  # the EXIF orientation swapped width and height
        full_size = (full_size[1], full_size[0])
    return img, full_size


def read_image(path: str | os.PathLike[str], draft_to: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_image` plus the full (W, H), for callers that resize to at most ``draft_to``.

    A JPEG may then be decoded at a reduced scale while both sides stay at least three times
    ``draft_to``; the resized result differs from a full decode by about one grey level at most.
    The full size is what the image's mask must match.
    """
    path = Path(path)
    img, full_size = _open(path, "image", draft_to)
    return _to_rgb(img, path), full_size


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling high bit depths instead of clipping them."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and values.max(initial=0.0) <= 1.0:
            scale = 255.0  # float images in [0, 1]
        elif img.mode == "F":
            scale = 1.0  # float images already in [0, 255]
        else:
            scale = 255.0 / 65535.0  # 16-bit range (Pillow opens 16-bit PNG/TIFF as I;16 or I)
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # resolves palette transparency without Pillow's warning
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise DataError(f"{path}: unsupported colour mode {img.mode} ({exc})") from None


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as RGB with its EXIF orientation applied.

    Multi-page files give their first page. Any Pillow mode is accepted: greyscale and palette
    images are expanded, alpha is dropped
    (the stored colour is kept), 16-bit and 32-bit integer images are scaled from 0..65535,
    float images from 0..1 (or 0..255 when values exceed 1), CMYK is converted naively.
    """
    return read_image(path)[0]


def load_mask(
    path: str | os.PathLike[str], image_size: tuple[int, int], *, image_path: str | os.PathLike[str] | None = None
) -> np.ndarray:
    """Read a ground-truth mask as a boolean (H, W) array; nonzero pixels are defect.

    ``image_size`` is the (W, H) of the (EXIF-oriented) image the mask belongs to; a mask of
    another size is rejected, naming ``image_path`` too when given. Colour masks count a pixel as
    defect when any colour channel is nonzero (alpha ignored). JPEG masks are thresholded at half
    range instead, because lossy compression leaves small nonzero values around every edge.
    """
    path = Path(path)
    img, _ = _open(path, "mask")
    if img.size != tuple(image_size):
        of_image = f"its image {image_path}" if image_path is not None else "its image"
        raise DataError(
            f"{path}: mask is {img.size[0]}x{img.size[1]} but {of_image} is {image_size[0]}x{image_size[1]}"
        )
    if img.mode in _GREY_MASK_MODES:
        values = np.asarray(img)
    elif img.mode == "LA":
        values = np.asarray(img.getchannel("L"))
    else:
        values = np.asarray(_to_rgb(img, path)).max(axis=2)
    threshold = 127 if img.format == "JPEG" else 0
    return values > threshold


def size_hw(size: Size) -> tuple[int, int]:
    """Normalise an int (square) or (H, W) size and check it is positive."""
    height, width = (size, size) if isinstance(size, Integral) else size
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(height), int(width)


def image_to_tensor(img: Image.Image, size: Size) -> torch.Tensor:
    """RGB image -> float32 (3, H, W) tensor in [0, 1], resized bilinearly with antialiasing.

    The resize runs on the 8-bit channels-last pixels (torch's vectorised uint8 path, several
    times faster than float on large images; within one grey level of a float resize and of
    Pillow's bilinear), and only the small result is converted to float.
    """
    height, width = size_hw(size)
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}; read it with load_image")
    pixels = torch.from_numpy(np.array(img))  # (h, w, 3) uint8; np.array because torch needs a writable buffer
    chw = pixels.permute(2, 0, 1).unsqueeze(0)
    if chw.shape[-2:] != (height, width):
        chw = F.interpolate(chw, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return chw[0].to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def mask_to_tensor(mask: np.ndarray, size: Size) -> torch.Tensor:
    """Boolean (h, w) mask -> bool (H, W) tensor, nearest-neighbour resized (pixel-centre aligned)."""
    height, width = size_hw(size)
    values = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))
    if values.shape != (height, width):
        values = F.interpolate(values[None, None], size=(height, width), mode="nearest-exact")[0, 0]
    return values.bool()
