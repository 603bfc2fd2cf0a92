"""Image files -> :class:`Views` under a geometry: one image to inspect, or a dataset of views to fit on.

:func:`view_dataset` is what fitting sees: for the square resize the plain
:class:`~defectscope.data.ImageDataset`, for keep-aspect or a region of interest one view per
image, and for tiles one item per tile (the tile counts come from the files' headers, and each
image is decoded once for all of its tiles).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data import ImageDataset, Sample
from ..data.dataset import sample_item
from ..data.image_io import image_header_size, load_mask, read_image
from ..errors import DataError
from . import Geometry
from .views import Views, crop_region, tile_layout

#: Reads an image for a given JPEG draft target (None: full resolution) -> (RGB image, native (W, H)).
Reader = Callable[[int | None], tuple[Image.Image, tuple[int, int]]]


@dataclass
class Opened:
    """One decoded image: its views, and on request its native region pixels and ground truth."""

    views: Views
    image: np.ndarray | None  # (H, W, 3) uint8 native pixels of the region
    mask: np.ndarray | None  # (H, W) bool native ground truth of the region


def open_image(
    read: Reader, name: str, geometry: Geometry, image_size: int, native: bool = False
) -> tuple[Views, np.ndarray | None, tuple[int, int]]:
    """Views of one image, its native region pixels (with ``native``) and its full (W, H).

    The views are always made from the same decode (a JPEG drafted near the input size where the
    geometry allows it), so scores never depend on whether the native pixels were asked for.
    """
    draft = image_size if geometry.tile is None and geometry.roi is None else None
    img, full = read(draft)
    try:
        region = crop_region(img, geometry, name)
        views = Views(region, geometry, image_size)
        views.full = full
        pixels = None
        if native:
            if img.size != full:  # drafted: decode once more at full resolution for the pixels
                img.close()
                img, _ = read(None)
                region = crop_region(img, geometry, name)
            pixels = np.array(region)
    finally:
        img.close()
    return views, pixels, full


def region_mask(sample: Sample, full: tuple[int, int], geometry: Geometry) -> np.ndarray | None:
    """The sample's native ground-truth mask, cut to the region of interest (None without a mask)."""
    if sample.mask_path is None:
        return None
    mask = load_mask(sample.mask_path, full, image_path=sample.path)
    if geometry.roi is not None:
        x, y, w, h = geometry.roi
        mask = mask[y : y + h, x : x + w]
    return mask


def open_sample(
    sample: Sample, geometry: Geometry, image_size: int, native: bool = False, masks: bool = False
) -> Opened:
    """:func:`open_image` of a sample's file, plus its native mask with ``masks``."""
    views, pixels, full = open_image(
        lambda draft: read_image(sample.path, draft_to=draft), str(sample.path), geometry, image_size, native
    )
    return Opened(views, pixels, region_mask(sample, full, geometry) if masks else None)


def check_region(samples: Sequence[Sample], geometry: Geometry) -> None:
    """A DataError naming the first sample the region of interest does not fit in (headers only)."""
    if geometry.roi is None:
        return
    x, y, w, h = geometry.roi
    for sample in samples:
        width, height = image_header_size(sample.path)
        if x + w > width or y + h > height:
            raise DataError(
                f"{sample.path}: the region of interest x={x} y={y} w={w} h={h} does not fit in this "
                f"{width}x{height} image"
            )


def _item(sample: Sample, views: Views, index: int, geometry: Geometry) -> dict[str, Any]:
    """The dataset item of view ``index`` of ``sample``, as :class:`ImageDataset` items are."""
    size = views.image_size
    if sample.mask_path is None:
        mask = torch.zeros(size, size, dtype=torch.bool)
    else:
        native = region_mask(sample, views.full, geometry)
        assert native is not None
        mask = views.mask_view(native, index)
    return sample_item(sample, views.get(index, index + 1)[0], mask)


class ViewDataset(ImageDataset):
    """An :class:`ImageDataset` whose items are views: one per image, or one per tile."""

    def __init__(self, samples: Sequence[Sample], image_size: int, geometry: Geometry) -> None:
        super().__init__(samples, image_size)
        self.geometry, self.side = geometry, image_size
        self.images = list(samples)
        self.index: list[tuple[int, int]] = []
        for i, sample in enumerate(self.images):
            self.index += [(i, k) for k in range(self._count(sample))]
        #: The sample of each item (a tile's image), as :attr:`ImageDataset.samples` is.
        self.samples = [self.images[i] for i, _ in self.index]
        self._lock = threading.Lock()
        self._decoded: OrderedDict[int, _Once] = OrderedDict()

    def _count(self, sample: Sample) -> int:
        if self.geometry.tile is None:
            return 1
        width, height = image_header_size(sample.path)
        if self.geometry.roi is not None:
            width, height = self.geometry.roi[2], self.geometry.roi[3]
        return len(tile_layout(height, width, self.geometry)[1])

    def __len__(self) -> int:
        return len(self.index)

    def _views(self, i: int) -> Views:
        """The views of image ``i``, decoded once for all of its items (the last few images are kept)."""
        with self._lock:
            once = self._decoded.get(i)
            if once is None:
                once = self._decoded[i] = _Once()
                while len(self._decoded) > 4:
                    self._decoded.popitem(last=False)
        return once.get(lambda: self._open(i))

    def _open(self, i: int) -> Views:
        sample = self.images[i]
        return open_image(
            lambda draft: read_image(sample.path, draft_to=draft), str(sample.path), self.geometry, self.side
        )[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, k = self.index[index]
        views = self._views(i)
        if k >= len(views):  # the header promised more tiles than the decoded image has
            raise DataError(f"{self.images[i].path}: the image changed while it was being read")
        return _item(self.images[i], views, k, self.geometry)


class _Once:
    """A value computed by the first caller; the others wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: Views | None = None

    def get(self, make: Callable[[], Views]) -> Views:
        with self._lock:
            if self._value is None:
                self._value = make()
            return self._value


def view_dataset(samples: Sequence[Sample], image_size: int, geometry: Geometry) -> ImageDataset:
    """What a method fits on under ``geometry`` (see the module docstring)."""
    if geometry.is_plain:
        return ImageDataset(samples, image_size)
    return ViewDataset(samples, image_size, geometry)
