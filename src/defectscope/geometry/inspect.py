"""Score whole images under a geometry: views batched across images, results put back per image.

:func:`inspect_samples` is how every front end scores files (``test``, ``predict``, calibration);
:func:`assemble` is its core for any source of :class:`Views` (the service feeds it uploads). Views
of consecutive images share batches of ``batch_size``, so tiles of small images fill a batch and
a large image's tiles go through a few at a time: memory stays bounded by the batch, the working
resolution map and the image, whatever the image's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from ..data import Sample
from ..data.dataset import ordered_items
from ..progress import progress_enabled
from . import Geometry
from .sources import Opened, open_sample
from .views import Assembler, Views

K = TypeVar("K")


class _Predicted(Protocol):
    """What :func:`assemble` needs of a prediction (a :class:`~defectscope.methods.Prediction`)."""

    scores: torch.Tensor
    maps: torch.Tensor
    reconstructions: torch.Tensor | None


Predict = Callable[[torch.Tensor], _Predicted]


@dataclass
class Assembled(Generic[K]):
    """One image's result: its key, score, map at the working resolution and reconstruction."""

    key: K
    views: Views
    score: float
    map: np.ndarray  # (h, w) float32
    reconstruction: np.ndarray | None  # (h, w, 3) uint8


def assemble(predict: Predict, batch_size: int, items: Iterable[tuple[K, Views]]) -> Iterator[Assembled[K]]:
    """Run the views of ``items`` through ``predict`` in batches of ``batch_size``; results in item order."""
    waiting: deque[tuple[K, Views, Assembler]] = deque()
    segments: list[tuple[Assembler, Views, int, int]] = []
    filled = 0

    def run() -> None:
        pred = predict(torch.cat([views.get(a, b) for _, views, a, b in segments]))
        offset = 0
        for asm, _, a, b in segments:
            n = b - a
            recon = pred.reconstructions
            asm.add(
                pred.scores[offset : offset + n],
                pred.maps[offset : offset + n],
                None if recon is None else recon[offset : offset + n],
            )
            offset += n
        segments.clear()

    def finished() -> Iterator[Assembled[K]]:
        while waiting and waiting[0][2].done:
            key, views, asm = waiting.popleft()
            score, amap, recon = asm.result()
            yield Assembled(key, views, score, amap, recon)

    for key, views in items:
        asm = Assembler(views)
        waiting.append((key, views, asm))
        start = 0
        while start < len(views):
            take = min(batch_size - filled, len(views) - start)
            segments.append((asm, views, start, start + take))
            filled, start = filled + take, start + take
            if filled == batch_size:
                run()
                filled = 0
                yield from finished()
    if segments:
        run()
    yield from finished()


@dataclass
class Inspected:
    """One scored image file (see :mod:`defectscope.geometry`)."""

    sample: Sample
    score: float
    map: np.ndarray  # (h, w) float32 at the working resolution
    size: tuple[int, int]  # (H, W) native size of the inspected region
    image: np.ndarray | None  # (H, W, 3) uint8 native pixels (when asked for)
    mask: np.ndarray | None  # (H, W) bool native ground truth (when asked for and the sample has one)
    reconstruction: np.ndarray | None  # (h, w, 3) uint8, reconstruction methods only

    @property
    def path(self) -> str:
        return str(self.sample.path)

    @property
    def has_mask(self) -> bool:
        """False only for a defect without a mask, whose pixels must not be scored."""
        return self.sample.label == 0 or self.sample.mask_path is not None


class _Files:
    """Samples opened under a geometry, one item per image (for :func:`ordered_items`)."""

    def __init__(self, samples: Sequence[Sample], geometry: Geometry, image_size: int, native: bool, masks: bool):
        self.samples, self.geometry, self.image_size = list(samples), geometry, image_size
        self.native, self.masks = native, masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, Opened]:
        return index, open_sample(self.samples[index], self.geometry, self.image_size, self.native, self.masks)


def inspect_samples(
    predict: Predict,
    samples: Sequence[Sample],
    geometry: Geometry,
    image_size: int,
    batch_size: int,
    *,
    native: bool = False,
    masks: bool = False,
    desc: str | None = None,
    threads: int = 2,
) -> Iterator[Inspected]:
    """Score every sample, in order: files decoded ahead in ``threads`` threads, views batched across images.

    With ``native`` each result holds the region's native pixels (for overlays), with ``masks`` its
    native ground truth. The first unreadable file stops the iteration with its DataError. With
    ``desc``, a progress bar counts images (unless DEFECTSCOPE_NO_PROGRESS is set).
    """
    files = _Files(samples, geometry, image_size, native, masks)
    # whole images: enough decoded ahead to fill two batches; tiles: a large image fills batches on its
    # own, so only a few are held (a camera image and its pixels are tens of megabytes each)
    window = 2 * max(batch_size, threads) if geometry.tile is None else 2 * threads
    opened: dict[int, Opened] = {}

    def items() -> Iterator[tuple[int, Views]]:
        for index, item in ordered_items(files, threads, window=window):
            opened[index] = item
            yield index, item.views

    hide = desc is None or not progress_enabled()
    with tqdm(total=len(files), desc=desc, unit="img", disable=hide) as progress:
        for done in assemble(predict, batch_size, items()):
            item = opened.pop(done.key)
            progress.update(1)
            yield Inspected(
                samples[done.key],
                done.score,
                done.map,
                done.views.native,
                item.image,
                item.mask,
                done.reconstruction,
            )
