"""DRAEM-style anomalies: a Perlin-noise shape filled with a blended, augmented texture."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...errors import DataError
from ..image_io import IMAGE_EXTENSIONS, image_to_tensor, load_image
from .augment import changed_region, random_colour, random_geometry, resize
from .base import check_image, no_anomaly
from .perlin import perlin_mask

_MAX_TRIES = 10  # redraws when a draw changes no pixel visibly (e.g. beta close to 1)
_CACHE_SIZE = 32  # folder textures kept decoded at the working size


def texture_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files of a texture folder (and its subfolders, as in DTD), sorted; error when there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: texture folder not found")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"{root}: no texture images in folder (expected one of {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


class PerlinTexture:
    """Paint an augmented texture into a random Perlin-noise shape (DRAEM, Zavrtanik et al. 2021).

    The shape is :func:`perlin_mask` (threshold 0.5, scales 2^0..2^5, random rotation). Inside
    it the result is ``(1 - beta) * A + beta * I`` with ``beta`` drawn from ``beta`` and ``A``
    the augmented texture; outside it the image is untouched. The returned mask marks exactly the
    pixels that changed by at least one 8-bit grey level; the others keep their input values.

    Texture source (``texture_source`` attribute):

    - ``"folder"``: image files under ``texture_dir`` (e.g. DTD), read with ``data.image_io`` and
      resized to the image size when first needed;
    - ``"given"``: the ``textures`` tensors (3, H, W), resized to the image size as needed;
    - ``"training images"`` (neither given): the input image itself, heavily augmented.

    Every texture gets a random crop rescaled to full size, flips and a rotation, then three
    distinct colour operations out of gamma contrast, brightness, channel shuffle with a hue turn,
    posterise, invert, solarise, sharpen and autocontrast.

    ``probability`` is the chance of an anomaly at all; otherwise the image comes back unchanged
    with an empty mask (DRAEM trains with 0.5).
    """

    kind = "perlin"

    def __init__(
        self,
        textures: Sequence[torch.Tensor] | None = None,
        texture_dir: str | os.PathLike[str] | None = None,
        beta: tuple[float, float] = (0.1, 1.0),
        probability: float = 1.0,
    ) -> None:
        if textures is not None and texture_dir is not None:
            raise ValueError("give textures or texture_dir, not both")
        if not 0.0 <= beta[0] < beta[1] <= 1.0:
            raise ValueError(f"beta must be a range within [0, 1], got {beta!r}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.beta = (float(beta[0]), float(beta[1]))
        self.probability = float(probability)
        self.texture_dir = Path(texture_dir).expanduser() if texture_dir is not None else None
        self._files = texture_files(texture_dir) if texture_dir is not None else []
        self._textures = list(textures) if textures is not None else []
        if textures is not None and not self._textures:
            raise DataError("PerlinTexture: the list of textures is empty")
        for texture in self._textures:
            check_image(texture, "texture")
        self.texture_source = "folder" if self._files else "given" if self._textures else "training images"
        self._cache: OrderedDict[tuple[int, tuple[int, int]], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = f", texture_dir='{self.texture_dir}'" if self.texture_dir else ""
        return f"PerlinTexture(source={self.texture_source!r}{where}, beta={self.beta}, probability={self.probability})"

    def _folder_texture(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        key = (index, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        texture = image_to_tensor(load_image(self._files[index]), size)
        with self._lock:
            self._cache[key] = texture
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return texture

    def _texture(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        size = (image.shape[1], image.shape[2])
        if self._files:
            source = self._folder_texture(int(rng.integers(len(self._files))), size)
        elif self._textures:
            source = resize(self._textures[int(rng.integers(len(self._textures)))], size)
        else:
            source = image
        return random_colour(random_geometry(source.to(image.dtype), rng), rng)

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_image(image)
        if rng.random() >= self.probability:
            return no_anomaly(image)
        for _ in range(_MAX_TRIES):
            region = torch.from_numpy(perlin_mask((image.shape[1], image.shape[2]), rng))
            beta = rng.uniform(*self.beta)
            candidate = (1.0 - beta) * self._texture(image, rng) + beta * image
            result, mask = changed_region(image, candidate, region)
            if mask.any():
                return result, mask
        return no_anomaly(image)
