"""Reading anomaly-detection datasets: folder layouts, robust image and mask IO, batches.

Typical use::

    from defectscope.data import ImageDataset, iterate_batches, mvtec_samples

    train = ImageDataset(mvtec_samples("examples/bottle_small", "train"), image_size=256)
    for batch in iterate_batches(train, batch_size=16, desc="fit"):
        batch["image"]  # (B, 3, 256, 256) float in [0, 1]
"""

from defectscope.data.dataset import ImageDataset, iterate_batches
from defectscope.data.image_io import (
    IMAGE_EXTENSIONS,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    read_image,
)
from defectscope.data.layouts import Sample, find_categories, folder_samples, mvtec_samples

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "Sample",
    "find_categories",
    "folder_samples",
    "image_to_tensor",
    "iterate_batches",
    "load_image",
    "load_mask",
    "mask_to_tensor",
    "mvtec_samples",
    "read_image",
]
