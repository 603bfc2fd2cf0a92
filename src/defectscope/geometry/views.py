"""One image's network inputs under a :class:`~defectscope.geometry.Geometry`, and their maps put back.

:class:`Views` holds an image as 8-bit pixels at the working resolution and makes its
``image_size`` x ``image_size`` float views on demand, a few at a time, so a camera image of
8000 x 2000 pixels never exists as all of its tiles at once. :class:`Assembler` puts the views'
scores and maps back together as they come: the image score and one map at the working
resolution (square: image_size x image_size; keep-aspect: the unpadded content; tiles: the scaled
image), in the image's own aspect ratio except for the square resize.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.image_io import resize_uint8
from ..errors import DataError
from . import Geometry


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length`` pixels: evenly spread, neighbours overlapping by at
    least ``overlap``, the first at 0 and the last ending exactly at ``length`` (one tile at 0 when
    ``length <= tile``)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def blend_weights(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) stitching weights: 1 inside, falling off linearly across ``overlap`` pixels at each edge."""
    x = torch.arange(tile, dtype=torch.float32)
    ramp = torch.minimum((x + 1) / (overlap + 1), (tile - x) / (overlap + 1)).clamp(max=1.0)
    return ramp[:, None] * ramp[None, :]


def tile_layout(height: int, width: int, geometry: Geometry) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """For a region of ``height`` x ``width`` pixels: its scaled size and the (row, column) start of each tile.

    A scaled side shorter than a tile is padded up to one tile, so starts refer to the padded canvas.
    """
    assert geometry.tile is not None
    tile = geometry.tile
    scaled = (max(1, round(height * geometry.scale)), max(1, round(width * geometry.scale)))
    rows = tile_starts(max(scaled[0], tile), tile, geometry.overlap)
    cols = tile_starts(max(scaled[1], tile), tile, geometry.overlap)
    return scaled, [(r, c) for r in rows for c in cols]


def crop_region(img: Image.Image, geometry: Geometry, path: str) -> Image.Image:
    """The region of interest of ``img`` (``img`` itself without one); a DataError when it does not fit."""
    if geometry.roi is None:
        return img
    x, y, w, h = geometry.roi
    if x + w > img.width or y + h > img.height:
        raise DataError(
            f"{path}: the region of interest x={x} y={y} w={w} h={h} does not fit in this "
            f"{img.width}x{img.height} image"
        )
    return img.crop((x, y, x + w, y + h))


def _reflect_pad(pixels: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """(C, H, W) pixels padded by reflection (repeated for pads larger than the image)."""
    if top == bottom == left == right == 0:
        return pixels
    return np.pad(pixels, ((0, 0), (top, bottom), (left, right)), mode="reflect")


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(N, C, h, w) -> (N, C, *size); identity when the size already matches."""
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


class Views:
    """The network inputs of one image (already cropped to its region of interest)."""

    def __init__(self, region: Image.Image, geometry: Geometry, image_size: int) -> None:
        self.geometry, self.image_size = geometry, image_size
        self.native = (region.height, region.width)
        #: The (W, H) of the whole image the region was cut from (its mask has this size); set by
        #: :func:`~defectscope.geometry.sources.open_image`, the region's own size until then.
        self.full = (region.width, region.height)
        s = image_size
        if geometry.tile is not None:
            tile = geometry.tile
            scaled, self.starts = tile_layout(region.height, region.width, geometry)
            pixels = resize_uint8(region, scaled).numpy()
            self.pixels = _reflect_pad(pixels, 0, max(0, tile - scaled[0]), 0, max(0, tile - scaled[1]))
            self.box = (0, 0, *scaled)  # the work map inside the padded canvas
        elif geometry.resize == "keep-aspect":
            ratio = s / max(region.height, region.width)
            content = (max(1, round(region.height * ratio)), max(1, round(region.width * ratio)))
            top, left = (s - content[0]) // 2, (s - content[1]) // 2
            pixels = resize_uint8(region, content).numpy()
            self.pixels = _reflect_pad(pixels, top, s - content[0] - top, left, s - content[1] - left)
            self.box = (top, left, *content)
            self.starts = [(0, 0)]
        else:
            self.pixels = resize_uint8(region, s).numpy()
            self.box = (0, 0, s, s)
            self.starts = [(0, 0)]

    @property
    def tile(self) -> int:
        """Side of one view in working pixels (before the resize to ``image_size``)."""
        return self.geometry.tile if self.geometry.tile is not None else self.image_size

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, start: int, stop: int) -> torch.Tensor:
        """Views ``start:stop`` as a float (k, 3, image_size, image_size) tensor in [0, 1]."""
        t = self.tile
        crops = np.stack([self.pixels[:, r : r + t, c : c + t] for r, c in self.starts[start:stop]])
        views = torch.from_numpy(crops).float().div_(255.0)
        return _resize(views, (self.image_size, self.image_size))

    def mask_view(self, mask: np.ndarray, index: int) -> torch.Tensor:
        """The native (H, W) bool ``mask`` of the region, cut and resized as view ``index`` (nearest)."""
        top, left, h, w = self.box
        t = self.tile
        work = _resize(torch.from_numpy(mask.astype(np.uint8))[None, None], (h, w), "nearest")[0, 0]
        canvas = torch.zeros(max(self.pixels.shape[1], top + h), max(self.pixels.shape[2], left + w), dtype=torch.uint8)
        canvas[top : top + h, left : left + w] = work
        r, c = self.starts[index]
        view = canvas[r : r + t, c : c + t] if self.geometry.tile is not None else canvas
        return _resize(view[None, None], (self.image_size, self.image_size), "nearest")[0, 0].bool()


class Assembler:
    """Collects the scores, maps (and reconstructions) of one image's views, in any chunks, in order."""

    def __init__(self, views: Views) -> None:
        self.views = views
        self.scores: list[torch.Tensor] = []
        self.received = 0
        tiled = views.geometry.tile is not None
        canvas = views.pixels.shape[1:]
        self.weights = blend_weights(views.tile, views.geometry.overlap) if tiled else None
        self.total = torch.zeros(canvas) if tiled else None
        self.norm = torch.zeros(canvas) if tiled else None
        self.recon_total: torch.Tensor | None = None
        self.single: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def done(self) -> bool:
        return self.received == len(self.views)

    def add(self, scores: torch.Tensor, maps: torch.Tensor, recons: torch.Tensor | None) -> None:
        """The next ``len(scores)`` views' scores (k,), maps (k, S, S) and reconstructions (k, 3, S, S)."""
        self.scores.append(scores)
        if self.weights is None:
            self.single = (maps[0], None if recons is None else recons[0])
            self.received += 1
            return
        assert self.total is not None and self.norm is not None
        t, w = self.views.tile, self.weights
        maps = _resize(maps[:, None], (t, t))[:, 0]
        if recons is not None:
            recons = _resize(recons, (t, t))
            if self.recon_total is None:
                self.recon_total = torch.zeros(3, *self.total.shape)
        for k in range(len(scores)):
            r, c = self.views.starts[self.received + k]
            self.total[r : r + t, c : c + t] += maps[k] * w
            self.norm[r : r + t, c : c + t] += w
            if recons is not None and self.recon_total is not None:
                self.recon_total[:, r : r + t, c : c + t] += recons[k] * w
        self.received += len(scores)

    def result(self) -> tuple[float, np.ndarray, np.ndarray | None]:
        """The image score, map (h, w) and reconstruction (h, w, 3) uint8.

        The square resize keeps the method's own score. Keep-aspect and tiles score the image by the
        maximum of its assembled map, so the padding (cut off) and the tile edges (weighted down
        where tiles overlap) do not decide it. A non-finite view score makes the image's NaN: never
        a trusted score.
        """
        scores = torch.cat(self.scores)
        top, left, h, w = self.views.box
        if self.single is not None:
            amap, recon = self.single
        else:
            assert self.total is not None and self.norm is not None
            amap = self.total / self.norm
            recon = None if self.recon_total is None else self.recon_total / self.norm
        amap = amap[top : top + h, left : left + w]
        if self.views.geometry.tile is None and self.views.geometry.resize == "square":
            score = float(scores.max())  # torch's max propagates NaN
        else:
            score = float(amap.max()) if bool(torch.isfinite(scores).all()) else math.nan
        rgb = None
        if recon is not None:
            rgb = (recon[:, top : top + h, left : left + w].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return score, amap.contiguous().numpy().astype(np.float32, copy=False), rgb
