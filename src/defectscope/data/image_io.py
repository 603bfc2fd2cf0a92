"""Robust image and mask reading, and conversion to resized tensors.

Every reader turns whatever Pillow can open (any colour mode, 16-bit, EXIF-rotated JPEGs) into
one predictable form, and turns every unusable file into a one-line :class:`DataError` naming it.
Images over a pixel limit (default 8192 x 8192, ``$DEFECTSCOPE_MAX_PIXELS`` or
:func:`set_max_image_pixels`) are refused from their header, before decoding; Pillow's own
warnings never reach the user.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

Size = int | tuple[int, int]

# JPEGs are decoded at a reduced DCT scale only while both sides stay at least this many times the
# target size: measured on MVTec bottle, the resized result then differs from a full decode by at
# most about 1/255 (mean 0.05/255), while decoding a 2700 px JPEG for a 256 px target is ~4x faster.
_DRAFT_MARGIN = 3

# High-bit-depth images are scaled to 8 bits this many rows at a time, so a large 16-bit image
# needs a few extra megabytes instead of several float copies of itself.
_BAND_ROWS = 512

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_GREY_MASK_MODES = frozenset({"1", "L", "I", "F"}) | _SIXTEEN_BIT_MODES

# EXIF orientation tag values -> the transpose that displays the stored pixels upright.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

MAX_PIXELS_ENV = "DEFECTSCOPE_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 8192 * 8192  # 64 Mi pixels: a 8192 x 8192 or 16384 x 4096 camera image
_max_pixels: int | None = None  # set by set_max_image_pixels; None: environment or default

# Pillow's header parsing reads process-wide settings (its decompression-bomb limit, the warnings
# filters); the short header and EXIF steps run under this lock so decode threads never race on them.
_PILLOW_SETTINGS = threading.Lock()


def set_max_image_pixels(limit: int | None) -> None:
    """Set the largest image (width x height) any reader accepts; None restores the default.

    The default is ``$DEFECTSCOPE_MAX_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`
    (8192 x 8192). Larger files are refused from their header, before any pixel is decoded: a
    decoded RGB image takes 3 bytes per pixel, and loading and resizing it briefly needs about
    three times that. The limit replaces Pillow's own decompression-bomb check for the files
    defectscope reads; Pillow's setting is left as it is for everything else.
    """
    global _max_pixels
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, Integral) or limit < 1):
        raise ValueError(f"the pixel limit must be a positive integer, got {limit!r}")
    _max_pixels = None if limit is None else int(limit)


def max_image_pixels() -> int:
    """The pixel limit in force: :func:`set_max_image_pixels`, else the environment, else the default."""
    if _max_pixels is not None:
        return _max_pixels
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive whole number of pixels (e.g. 67108864)")
    return value


@contextmanager
def _pillow_quietly() -> Iterator[None]:
    """Pillow's own warnings (decompression bomb, corrupt EXIF, odd TIFF tags) stay inside.

    Each case they flag is decided here instead: the size is checked against our limit, and
    unreadable EXIF means no rotation.
    """
    with _PILLOW_SETTINGS, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _one_line(exc: BaseException) -> str:
    """The reason an exception gives, on one line (an OSError's own text repeats the path)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _open(path: Path, what: str, draft_to: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Open, fully decode and EXIF-orient one file, or raise a DataError naming it.

    Returns the image and its full oriented (W, H): with ``draft_to`` a JPEG may be decoded at a
    reduced DCT scale, keeping both sides at least ``_DRAFT_MARGIN * draft_to``. The size limit
    and the single-frame rule are checked on the header, before any pixel is decoded.
    """
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} path is not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: {what} file is empty (0 bytes)")
    return _open_stream(lambda: open(path, "rb"), path, what, draft_to)


def _open_stream(
    opener: Callable[[], BinaryIO], path: str | Path, what: str, draft_to: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    """The decoding half of :func:`_open` for any binary stream; ``path`` names it in errors."""
    limit = max_image_pixels()
    try:
        with opener() as file:
            with _pillow_quietly():
                img = Image.open(file)
            return _decode(img, path, what, draft_to, limit)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except MemoryError:
        raise DataError(f"{path}: not enough memory to decode this {what}") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot read {what} ({_one_line(exc)})") from None


def _decode(
    img: Image.Image, path: str | Path, what: str, draft_to: int | None, limit: int
) -> tuple[Image.Image, tuple[int, int]]:
    """Check the header of an opened image, then decode and orient its pixels (see :func:`_open`)."""
    width, height = full_size = img.size
    if width * height > limit:
        raise DataError(
            f"{path}: {what} is {width}x{height} = {width * height} pixels, over the limit of {limit} "
            f"(raise it with {MAX_PIXELS_ENV})"
        )
    if width < 1 or height < 1:
        raise DataError(f"{path}: {what} has no pixels ({width}x{height})")
    with _pillow_quietly():  # MPO: a camera JPEG with preview or depth frames after the photo
        several = img.format != "MPO" and bool(getattr(img, "is_animated", False))
        frames = getattr(img, "n_frames", 2) if several else 1
    if several:
        raise DataError(
            f"{path}: {what} has {frames} frames (animated or multi-page); save the frame to use as its own file"
        )
    if draft_to is not None and img.format == "JPEG":
        side = _DRAFT_MARGIN * draft_to
        img.draft(img.mode, (side, side))
    img.load()
    with _pillow_quietly():
        orientation = img.getexif().get(_ORIENTATION_TAG)
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return img, full_size
    upright = img.transpose(method)
    if upright.size != img.size:  # the orientation swaps width and height
        full_size = (height, width)
    img.close()
    return upright, full_size


def image_header_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """The (W, H) an image file will have once read (EXIF orientation applied), from its header only.

    The same one-line :class:`DataError` as :func:`read_image` for missing, empty or unreadable
    files and for images over the pixel limit; the pixels are not decoded.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return _open(path, "image")[1]  # the reader's own message for a missing or empty file
    limit = max_image_pixels()
    try:
        with open(path, "rb") as file, _pillow_quietly():
            img = Image.open(file)
            width, height = img.size
            orientation = img.getexif().get(_ORIENTATION_TAG)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({_one_line(exc)})") from None
    if width * height > limit:
        raise DataError(
            f"{path}: image is {width}x{height} = {width * height} pixels, over the limit of {limit} "
            f"(raise it with {MAX_PIXELS_ENV})"
        )
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def read_image(path: str | os.PathLike[str], draft_to: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_image` plus the full (W, H), for callers that resize to at most ``draft_to``.

    A JPEG may then be decoded at a reduced scale while both sides stay at least three times
    ``draft_to``; the resized result differs from a full decode by about one grey level at most.
    The full size is what the image's mask must match.
    """
    path = Path(path)
    img, full_size = _open(path, "image", draft_to)
    return _to_rgb(img, path), full_size


def read_image_bytes(data: bytes, name: str, draft_to: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`read_image` for an image held in memory (an upload); ``name`` stands for the file in errors.

    The same limits and the same one-line :class:`DataError` messages as for a file.
    """
    if not data:
        raise DataError(f"{name}: image file is empty (0 bytes)")
    img, full_size = _open_stream(lambda: io.BytesIO(data), name, "image", draft_to)
    return _to_rgb(img, name), full_size


def _to_rgb(img: Image.Image, path: str | Path) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling high bit depths instead of clipping them."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        values = np.asarray(img)  # the pixels in their own type; scaled below a band of rows at a time
        if img.mode == "F" and not np.isfinite(values).all():
            raise DataError(f"{path}: floating-point image holds NaN or infinite values")
        if img.mode == "F" and values.max(initial=0.0) <= 1.0:
            scale = 255.0  # float images in [0, 1]
        elif img.mode == "F":
            scale = 1.0  # float images already in [0, 255]
        else:
            scale = 255.0 / 65535.0  # 16-bit range (Pillow opens 16-bit PNG/TIFF as I;16 or I)
        grey = np.empty(values.shape, dtype=np.uint8)
        for top in range(0, values.shape[0], _BAND_ROWS):
            band = values[top : top + _BAND_ROWS].astype(np.float32) * np.float32(scale)
            grey[top : top + _BAND_ROWS] = np.clip(np.rint(band, out=band), 0, 255, out=band)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # resolves palette transparency without Pillow's warning
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise DataError(f"{path}: unsupported colour mode {img.mode} ({exc})") from None


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as RGB with its EXIF orientation applied.

    Any Pillow mode is accepted: greyscale and palette images are expanded, alpha is dropped
    (the stored colour is kept), 16-bit and 32-bit integer images are scaled from 0..65535,
    float images from 0..1 (or 0..255 when values exceed 1), CMYK is converted naively.
    Refused with a one-line :class:`DataError` naming the file: missing, empty, truncated or
    unrecognised files, animated or multi-page files (GIF, TIFF, APNG, WebP: which frame is the
    part would be a guess; a camera JPEG's embedded preview frames are fine), and images larger
    than :func:`max_image_pixels`. An EXIF orientation outside 1..8 or an unreadable EXIF block
    means the stored pixels are used as they are, as most viewers show them.
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
    height, width = (size, size) if isinstance(size, (int, Integral)) else size
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(height), int(width)


def image_to_tensor(img: Image.Image, size: Size) -> torch.Tensor:
    """RGB image -> float32 (3, H, W) tensor in [0, 1], resized bilinearly with antialiasing.

    The resize runs on the 8-bit pixels (:func:`resize_uint8`), and only the small result is
    converted to float.
    """
    return resize_uint8(img, size).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def resize_uint8(img: Image.Image, size: Size) -> torch.Tensor:
    """RGB image -> uint8 (3, H, W) tensor, resized bilinearly with antialiasing.

    The resize runs on the 8-bit channels-last pixels (torch's vectorised uint8 path, several
    times faster than float on large images; within one grey level of a float resize and of
    Pillow's bilinear). An image more than three times the target on both sides is first
    box-averaged by an integer factor (keeping both sides at least three times the target, the
    same margin as the JPEG draft): the copies the resize needs are then small instead of
    several times the full image.
    """
    height, width = size_hw(size)
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}; read it with load_image")
    factor = min(img.width // (_DRAFT_MARGIN * width), img.height // (_DRAFT_MARGIN * height))
    if factor >= 2:  # box-average large images in Pillow first, as a JPEG draft does
        img = img.reduce(factor)
    pixels = torch.from_numpy(np.array(img))  # (h, w, 3) uint8; np.array because torch needs a writable buffer
    chw = pixels.permute(2, 0, 1).unsqueeze(0)
    if chw.shape[-2:] != (height, width):
        chw = F.interpolate(chw, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return chw[0]


def mask_to_tensor(mask: np.ndarray, size: Size) -> torch.Tensor:
    """Boolean (h, w) mask -> bool (H, W) tensor, nearest-neighbour resized (pixel-centre aligned)."""
    height, width = size_hw(size)
    values = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))
    if values.shape != (height, width):
        values = F.interpolate(values[None, None], size=(height, width), mode="nearest-exact")[0, 0]
    return values.bool()
