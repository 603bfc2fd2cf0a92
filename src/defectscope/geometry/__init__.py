"""Input geometry: how an image of any size becomes the square inputs a method sees, and back.

One layer around the method contract, the same for every method: a method fits and predicts on
``image_size`` x ``image_size`` views, and the geometry decides what those views are:

- ``square`` (default): the whole image squeezed to a square, as papers do on MVTec AD;
- ``keep-aspect``: the long side scaled to ``image_size``, the short side padded by reflection (the
  reflection repeated where the image is too thin); the padding's map is cut off again;
- tiles: the image (scaled by ``scale`` first) cut into ``tile`` x ``tile`` tiles at its own
  resolution, evenly spaced so that neighbours overlap by at least ``tile_overlap`` pixels and the
  last tile ends at the image's edge (an image smaller than a tile is padded by reflection); each
  tile is resized to ``image_size`` for the network, maps are stitched with weights that fall off
  linearly across the overlaps;
- with keep-aspect and tiles the image score is the maximum of the assembled map over the image
  (the square resize keeps the method's own score);
- ``roi`` (with any of them): only the region ``x, y, w, h`` of every image is inspected; maps,
  masks, overlays and pixel metrics cover that region only.

The geometry is saved with the model (``config.json``'s ``geometry``) and used by ``test``,
``predict`` and the service, so an image is always seen as it was at fitting time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..errors import DefectscopeError

Resize = Literal["square", "keep-aspect"]
RESIZES: tuple[Resize, ...] = ("square", "keep-aspect")
#: Largest ``scale``: tiles are cut from the image at most this many times enlarged.
MAX_SCALE = 4.0


@dataclass(frozen=True)
class Geometry:
    """How images become a method's inputs (see the module docstring)."""

    resize: Resize = "square"
    tile: int | None = None
    tile_overlap: int | None = None  # None: tile // 8
    scale: float = 1.0
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height in image pixels

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise DefectscopeError(f"resize must be one of {', '.join(RESIZES)}, got {self.resize!r}")
        if self.tile is None:
            if self.tile_overlap is not None:
                raise DefectscopeError("tile_overlap needs tiles: give a tile size too (--tile SIZE)")
            if self.scale != 1.0:
                raise DefectscopeError("scale applies to tiles: give a tile size too (--tile SIZE)")
        else:
            if self.resize != "square":
                raise DefectscopeError(
                    "tiles keep the image's aspect ratio already; --resize keep-aspect is for whole images"
                )
            if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 32:
                raise DefectscopeError(f"tile must be a whole number of pixels, at least 32, got {self.tile!r}")
            overlap = self.overlap
            if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= self.tile // 2:
                raise DefectscopeError(
                    f"tile_overlap must be a whole number of pixels from 0 to half the tile ({self.tile // 2}), "
                    f"got {self.tile_overlap!r}"
                )
            if not isinstance(self.scale, (int, float)) or not (0.0 < self.scale <= MAX_SCALE):
                raise DefectscopeError(f"scale must be above 0 and at most {MAX_SCALE:g}, got {self.scale!r}")
        if self.roi is not None:
            roi = tuple(self.roi)
            if len(roi) != 4 or any(isinstance(v, bool) or not isinstance(v, int) for v in roi):
                raise DefectscopeError(f"roi must be four whole numbers X,Y,W,H, got {self.roi!r}")
            x, y, w, h = roi
            if x < 0 or y < 0 or w < 1 or h < 1:
                raise DefectscopeError(f"roi {x},{y},{w},{h}: X and Y must be at least 0, W and H at least 1")
            object.__setattr__(self, "roi", roi)

    @property
    def overlap(self) -> int:
        """The tile overlap in pixels (0 without tiles)."""
        if self.tile is None:
            return 0
        return self.tile // 8 if self.tile_overlap is None else self.tile_overlap

    @property
    def is_plain(self) -> bool:
        """True for the square resize of whole images: the fast path of :class:`~defectscope.data.ImageDataset`."""
        return self.resize == "square" and self.tile is None and self.roi is None

    def describe(self, image_size: int) -> str:
        """The geometry in a few words for people."""
        if self.tile is not None:
            text = f"tiles of {self.tile} px (overlap {self.overlap} px)"
            if self.scale != 1.0:
                text += f" of the image scaled by {self.scale:g}"
            if self.tile != image_size:
                text += f", each resized to {image_size} px"
        elif self.resize == "keep-aspect":
            text = f"keep aspect: long side {image_size} px, short side padded"
        else:
            text = f"square resize to {image_size} x {image_size} px"
        if self.roi is not None:
            text += ", region of interest x={} y={} w={} h={}".format(*self.roi)
        return text

    def to_json(self) -> dict[str, Any]:
        """The geometry as config.json stores it."""
        out = asdict(self)
        out["roi"] = None if self.roi is None else list(self.roi)
        return out

    @classmethod
    def from_json(cls, value: Any) -> Geometry:
        """Inverse of :meth:`to_json`; a :class:`DefectscopeError` for anything else."""
        if not isinstance(value, dict) or set(value) - set(cls.__dataclass_fields__):
            raise DefectscopeError(f"geometry must be an object with the keys {', '.join(cls.__dataclass_fields__)}")
        roi = value.get("roi")
        scale = value.get("scale", 1.0)
        if isinstance(scale, int) and not isinstance(scale, bool):
            scale = float(scale)
        if isinstance(scale, float) and not math.isfinite(scale):
            raise DefectscopeError(f"scale must be a finite number, got {scale!r}")
        return cls(
            resize=value.get("resize", "square"),
            tile=value.get("tile"),
            tile_overlap=value.get("tile_overlap"),
            scale=scale,
            roi=None if roi is None else tuple(roi) if isinstance(roi, list) else roi,
        )


def parse_roi(text: str) -> tuple[int, int, int, int]:
    """``"X,Y,W,H"`` -> four ints; a one-line error otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise DefectscopeError(f"--roi {text!r}: expected four whole numbers X,Y,W,H (e.g. 0,100,1200,400)")
    return values


__all__ = ["MAX_SCALE", "RESIZES", "Geometry", "Resize", "parse_roi"]
