"""Samples -> tensors: a torch Dataset and a threaded, ordered batch iterator."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NotRequired, Protocol, TypedDict, TypeVar

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..progress import progress_enabled
from .image_io import Size, image_to_tensor, load_mask, mask_to_tensor, read_image, size_hw
from .layouts import Sample

T_co = TypeVar("T_co", covariant=True)


class Indexed(Protocol[T_co]):
    """Anything with a length that returns an item for each index below it."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> T_co: ...


class ItemSource(Protocol):
    """Anything indexable that returns item dicts: an :class:`ImageDataset` or a dataset built on one."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class Picked:
    """The items of ``source`` at ``indices`` (an item source itself)."""

    def __init__(self, source: ItemSource, indices: list[int]) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[self.indices[index]]


class Batch(TypedDict):
    """A batch as :func:`iterate_batches` yields it from an :class:`ImageDataset` (B images of H x W).

    Sources built on a dataset add their own entries (synthetic anomalies, teacher features, ...).
    """

    image: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    mask: torch.Tensor  # (B, H, W) bool
    has_mask: torch.Tensor  # (B,) bool
    label: torch.Tensor  # (B,) long
    path: list[str]
    defect_type: list[str]
    category: list[str]
    synth_image: NotRequired[torch.Tensor]  # (B, 3, H, W): the image with a synthetic anomaly
    synth_mask: NotRequired[torch.Tensor]  # (B, H, W) float: where the synthetic anomaly is


class ImageDataset(Dataset):
    """Decodes samples into resized image and mask tensors.

    Each item is a dict: ``image`` (3, H, W) float in [0, 1], ``mask`` (H, W) bool (all False
    without a mask), ``has_mask`` (False only for defects without a mask, whose pixels must not
    be scored), ``label``, ``path``, ``defect_type``, ``category``.
    """

    def __init__(self, samples: Sequence[Sample], image_size: Size = 256) -> None:
        self.samples = list(samples)
        self.image_size = size_hw(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        img, full_size = read_image(sample.path, draft_to=max(self.image_size))
        image = image_to_tensor(img, self.image_size)
        img.close()  # the full-size pixels go before the mask is decoded: one large buffer at a time
        del img
        if sample.mask_path is None:
            mask = torch.zeros(self.image_size, dtype=torch.bool)
        else:
            mask = mask_to_tensor(load_mask(sample.mask_path, full_size, image_path=sample.path), self.image_size)
        return sample_item(sample, image, mask)


def sample_item(sample: Sample, image: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """The item dict of one image (or one view of it): its tensors and what the sample says about it.

    ``has_mask`` is False only for a defect without a mask, whose pixels must not be scored.
    """
    return {
        "image": image,
        "mask": mask,
        "has_mask": sample.label == 0 or sample.mask_path is not None,
        "label": sample.label,
        "path": str(sample.path),
        "defect_type": sample.defect_type,
        "category": sample.category,
    }


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, turn bools and ints into tensors, keep everything else as lists."""
    batch: dict[str, Any] = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


def ordered_items(dataset: Indexed[T_co], threads: int, window: int) -> Iterator[T_co]:
    """Dataset items in order, decoded ahead by a thread pool with at most ``window`` in flight.

    Pillow and torch release the GIL while decoding and resizing, so threads use all cores
    without the start-up cost and pickling of worker processes.
    """
    if threads <= 1:
        yield from (dataset[i] for i in range(len(dataset)))
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="defectscope-decode")
    try:
        indices = iter(range(len(dataset)))
        pending: deque[Future[T_co]] = deque(
            pool.submit(dataset.__getitem__, i) for _, i in zip(range(window), indices)
        )
        while pending:
            item = pending.popleft().result()  # re-raises the worker's DataError as it is
            next_index = next(indices, None)
            if next_index is not None:
                pending.append(pool.submit(dataset.__getitem__, next_index))
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iterate_batches(
    dataset: ItemSource, batch_size: int = 16, threads: int = 2, desc: str | None = None
) -> Iterator[Batch]:
    """Yield collated batches of ``dataset`` in order, decoding in ``threads`` threads.

    Batches hold ``image`` (B, 3, H, W), ``mask`` (B, H, W) bool, ``has_mask`` (B,) bool,
    ``label`` (B,) long and lists for ``path``, ``defect_type`` and ``category``. With ``desc``,
    a tqdm progress bar goes to stderr unless DEFECTSCOPE_NO_PROGRESS is set (to anything but 0).
    The first failing file stops the iteration with its DataError. ``threads <= 1`` decodes inline.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    hide = desc is None or not progress_enabled()
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=hide) as progress:
        items: list[dict[str, Any]] = []
        for item in ordered_items(dataset, threads, window=2 * max(batch_size, threads)):
            items.append(item)
            if len(items) == batch_size:
                progress.update(len(items))
                yield _collate(items)  # type: ignore[misc]
                items = []
        if items:
            progress.update(len(items))
            yield _collate(items)  # type: ignore[misc]
