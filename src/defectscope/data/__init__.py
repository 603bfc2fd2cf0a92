"""Reading anomaly-detection datasets: folder layouts, robust image and mask IO, batches.

Typical use::

    from defectscope.data import ImageDataset, iterate_batches, mvtec_samples

    train = ImageDataset(mvtec_samples("examples/bottle_small", "train"), image_size=256)
    for batch in iterate_batches(train, batch_size=16, desc="fit"):
        batch["image"]  # (B, 3, 256, 256) float in [0, 1]
"""

from .dataset import ImageDataset, iterate_batches
from .image_io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    max_image_pixels,
    read_image,
    set_max_image_pixels,
)
from .layouts import (
    IGNORED_NAMES,
    Sample,
    find_categories,
    folder_samples,
    image_files,
    is_ignored_name,
    mvtec_samples,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IGNORED_NAMES",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "Sample",
    "find_categories",
    "folder_samples",
    "image_files",
    "image_to_tensor",
    "is_ignored_name",
    "iterate_batches",
    "load_image",
    "load_mask",
    "mask_to_tensor",
    "max_image_pixels",
    "mvtec_samples",
    "read_image",
    "set_max_image_pixels",
]
