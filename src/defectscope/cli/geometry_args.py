"""The input-geometry flags of ``defectscope fit``: --resize, --tile, --tile-overlap, --scale, --roi."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from ..errors import DefectscopeError
from ..geometry import MAX_SCALE, RESIZES, Geometry, parse_roi
from .common import non_negative_int, parse_number, positive_int


def scale_factor(text: str) -> float:
    """An argparse type: a finite scale factor above 0 and at most :data:`MAX_SCALE`."""
    value = parse_number(text, "a scale factor")
    if not 0 < value <= MAX_SCALE:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_SCALE:g} (e.g. 0.5), got {text}")
    return value


def add_geometry_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "input geometry (saved with the model; test, predict and serve use it)",
        textwrap.fill(
            "How each image becomes the method's square inputs. Default: the whole image squeezed to "
            "--image-size x --image-size, as papers do. Long or large images keep their detail with tiles.",
            width=78,
        ),
    )
    group.add_argument(
        "--resize",
        choices=RESIZES,
        default="square",
        help="whole images: squeeze to a square (default), or keep-aspect: scale the long side to the input size "
        "and pad the short side by reflection (the padding is never scored)",
    )
    group.add_argument(
        "--tile",
        type=positive_int,
        metavar="SIZE",
        help="cut every image into overlapping SIZE x SIZE tiles at its own resolution (after --scale); the "
        "input size defaults to SIZE so tiles go in pixel for pixel; maps are stitched and the image score is "
        "the stitched map's maximum",
    )
    group.add_argument(
        "--tile-overlap",
        type=non_negative_int,
        metavar="PX",
        help="least overlap of neighbouring tiles in pixels, blended in the stitched map (default SIZE/8)",
    )
    group.add_argument(
        "--scale",
        type=scale_factor,
        metavar="S",
        help="with --tile: scale every image by S before cutting tiles (e.g. 0.5 for half resolution)",
    )
    group.add_argument(
        "--roi",
        metavar="X,Y,W,H",
        help="inspect only this region of every image (pixels; maps, masks and metrics cover it alone)",
    )


def geometry_from_args(args: argparse.Namespace, params: dict[str, Any]) -> Geometry:
    """The geometry the flags ask for; with --tile and no --image-size, the input size becomes the tile size."""
    scale = 1.0 if args.scale is None else args.scale
    geometry = Geometry(
        resize=args.resize,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        scale=scale,
        roi=None if args.roi is None else parse_roi(args.roi),
    )
    if geometry.tile is not None and "image_size" not in params:
        if geometry.tile % 16:
            raise DefectscopeError(
                f"--tile {geometry.tile}: the network input is the tile itself, so it must be a multiple of 16 "
                "(or give --image-size to resize every tile)"
            )
        params["image_size"] = geometry.tile
    return geometry
