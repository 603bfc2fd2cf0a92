"""A contact sheet of generated defects: one self-contained HTML page to judge a generator by eye.

Per defect type, the real images the generator learnt from sit beside a grid of generated images,
every image with its mask's edge drawn in green (as in the test report), under a table of the
generation metrics when they are given (:func:`.metrics.evaluate_generated`). Thumbnails are
embedded as JPEG data URLs, so the page is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.image_io import load_mask, read_image, resize_uint8
from ..outputs import atomic_write
from ..report.images import OUTLINE_GREEN, jpeg_bytes, mask_outline
from ..report.style import STYLE
from ..report.text import esc, fmt
from .diversity import IC_FD_NAME
from .inception import INCEPTION_SCORE_REASON

ImageLike = str | os.PathLike[str] | np.ndarray
#: An image and its mask: a file each, or an (H, W, 3) uint8 array and an (H, W) array (nonzero = defect).
Pair = tuple[ImageLike, ImageLike]

#: Long side of a thumbnail, in pixels.
THUMBNAIL = 160
OUTLINE_PX = 2

SHEET_STYLE = f"""
section.type {{ margin-top: 18px; border-top: 1px solid #ddd; }}
.pairs {{ display: grid; grid-template-columns: auto 1fr; gap: 12px 24px; align-items: start; }}
.side h3 {{ font-size: 14px; margin: 6px 0; color: #444; font-weight: 600; }}
.side.real {{ padding-right: 24px; border-right: 2px solid #e4e4e4; }}
.tiles {{ display: flex; flex-wrap: wrap; gap: 6px; }}
.side.real .tiles {{ width: {2 * THUMBNAIL + 18}px; }}
figure {{ margin: 0; background: #f2f2f2; padding: 3px; }}
.frame {{ width: {THUMBNAIL}px; height: {THUMBNAIL}px; display: flex; align-items: center; justify-content: center; }}
figure img {{ display: block; }}
figcaption {{ font-size: 11px; color: #555; text-align: center; overflow-wrap: anywhere; margin-top: 2px;
  width: {THUMBNAIL}px; }}
"""


def _rgb(image: ImageLike, side: int) -> tuple[Image.Image, tuple[int, int]]:
    """The image reduced to a long side of ``side`` (the loader's resize), and its full (W, H)."""
    if isinstance(image, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
        full = img.size
    else:
        img, full = read_image(image, draft_to=side)
    scale = side / max(full)
    size = (max(1, round(full[1] * scale)), max(1, round(full[0] * scale)))
    return Image.fromarray(resize_uint8(img, size).permute(1, 2, 0).numpy()), full


def _mask(mask: ImageLike, full: tuple[int, int], image: ImageLike) -> np.ndarray:
    """The (H, W) bool mask of an image of (W, H) ``full``."""
    if isinstance(mask, np.ndarray):
        values = np.asarray(mask) != 0
        if values.shape != (full[1], full[0]):
            raise ValueError(f"mask is {values.shape[1]}x{values.shape[0]} but its image is {full[0]}x{full[1]}")
        return values
    return load_mask(mask, full, image_path=None if isinstance(image, np.ndarray) else image)


def thumbnail(image: ImageLike, mask: ImageLike, side: int = THUMBNAIL) -> Image.Image:
    """The image at a long side of ``side`` with the edge of its mask in green.

    A thumbnail pixel belongs to the reduced mask when any part of it is defect, so thin cracks stay
    visible (a larger defect's outline grows by at most one pixel).
    """
    small, full = _rgb(image, side)
    region = Image.fromarray(_mask(mask, full, image).astype(np.uint8) * 255)
    reduced = np.asarray(region.resize(small.size, Image.Resampling.BOX)) > 0
    edge = mask_outline(reduced, OUTLINE_PX)
    if edge is not None:
        small.paste(OUTLINE_GREEN, edge[1], mask=edge[0])
    return small


def _caption(image: ImageLike, index: int) -> str:
    return f"#{index + 1}" if isinstance(image, np.ndarray) else Path(image).name


def _figure(pair: Pair, index: int, kind: str, name: str) -> str:
    image, mask = pair
    thumb = thumbnail(image, mask)
    data = base64.b64encode(jpeg_bytes(thumb, 88)).decode("ascii")
    caption = _caption(image, index)
    return (
        f'<figure><div class="frame"><img src="data:image/jpeg;base64,{data}" width="{thumb.width}" '
        f'height="{thumb.height}" alt="{esc(kind)} {esc(name)} {esc(caption)} with its mask outlined"></div>'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _kid_text(kid: Mapping[str, Any] | None) -> str:
    if not kid:
        return "n/a"
    std = kid.get("std")
    return fmt(kid.get("mean")) + (f" ± {fmt(std)}" if std is not None else " (one subset)")


def _metrics_rows(name: str, m: Mapping[str, Any]) -> str:
    """One table row of a type's metrics (the fields :func:`.metrics.evaluate_generated` writes)."""
    fid = m.get("fid")
    ic_fd = (m.get("ic_fd") or {}).get("value")
    align = m.get("alignment") or {}
    outside = align.get("changed_outside_mask")
    cells = [
        esc(m.get("count", "")),
        esc(m.get("real_compared", "")),
        "n/a" if fid is None else f"{fid:.1f}",
        _kid_text(m.get("kid")),
        fmt(ic_fd),
        "n/a" if outside is None else f"{outside} of {align.get('changed', 0)}",
    ]
    return f'<tr><th class="row">{esc(name)}</th>' + "".join(f'<td class="value">{c}</td>' for c in cells) + "</tr>"


def _metrics_table(types: Mapping[str, Mapping[str, Any]]) -> list[str]:
    head = ("defect type", "generated", "real compared", "FID", "KID", "IC-FD", "changed px outside mask")
    return [
        '<table class="metrics"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>",
        *(_metrics_rows(name, m) for name, m in types.items()),
        "</table>",
        f'<p class="small">IC-FD is {esc(IC_FD_NAME)}: the IC-LPIPS protocol with a substitute distance, not '
        "comparable with published IC-LPIPS values; n/a where no cluster holds two generated images. "
        f"Inception Score: not computed; {esc(INCEPTION_SCORE_REASON)}.</p>",
    ]


def contact_sheet(
    groups: Mapping[str, tuple[Sequence[Pair], Sequence[Pair]]],
    out_path: str | os.PathLike[str],
    title: str,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write the contact sheet to ``out_path`` atomically and return its path.

    ``groups`` maps each defect type to (real pairs it learnt from, generated pairs), each pair an
    image and its mask (files or arrays); ``metrics`` is the dict of
    :func:`.metrics.evaluate_generated`, whose ``types`` entries are tabulated when given.
    """
    types = dict((metrics or {}).get("types", {}))
    n_real = sum(len(real) for real, _ in groups.values())
    n_generated = sum(len(generated) for _, generated in groups.values())
    n_made = sum(int(m.get("count", 0)) for m in types.values())
    of_made = f" of {n_made}" if n_made > n_generated else ""
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title>",
        f"<style>{STYLE}{SHEET_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="facts">{len(groups)} defect types &middot; {n_real} real images learnt from &middot; '
        f"{n_generated}{of_made} generated images shown; masks outlined in green</p>",
    ]
    shown = {name: types[name] for name in groups if name in types}
    if shown:
        page += ["<h2>Metrics</h2>", *_metrics_table(shown)]
    for name, (real, generated) in groups.items():
        page += [
            f'<section class="type"><h2>{esc(name)}</h2><div class="pairs">',
            f'<div class="side real"><h3>real, learnt from ({len(real)})</h3><div class="tiles">',
            *(_figure(pair, i, "real", name) for i, pair in enumerate(real)),
            "</div></div>",
            f'<div class="side generated"><h3>generated ({len(generated)})</h3><div class="tiles">',
            *(_figure(pair, i, "generated", name) for i, pair in enumerate(generated)),
            "</div></div></div></section>",
        ]
    page.append("</body></html>")
    return atomic_write(Path(out_path), "\n".join(page) + "\n")
