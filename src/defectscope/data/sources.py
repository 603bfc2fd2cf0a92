"""Turning what a user points at (a folder, a dataset, a list of samples) into samples."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from .dataset import ImageDataset
from .image_io import IMAGE_EXTENSIONS
from .layouts import Sample, folder_samples, mvtec_samples


def _is_category(path: Path) -> bool:
    return (path / "train" / "good").is_dir() or ((path / "test").is_dir() and (path / "ground_truth").is_dir())


def resolve_category(data: str | os.PathLike, category: str | None = None) -> Path:
    """The category folder meant by ``data`` (a category itself, or a root plus ``category``)."""
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    found = _categories_in(root)
    if category:
        path = root / category
        if not path.is_dir():
            names = ", ".join(p.name for p in found)
            raise DataError(f"{path}: no such category folder" + (f" (found: {names})" if names else ""))
        return path
    if _is_category(root):
        return root
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(p.name for p in found)
        raise DataError(f"{root}: holds several categories ({names}); choose one with --category")
    return root


def _categories_in(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that are categories, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and _is_category(p)) if root.is_dir() else []


def training_samples(data: str | os.PathLike | ImageDataset | Iterable[Sample], category: str | None = None) -> list[Sample]:
    """Good training images: ``train/good`` of an MVTec-layout category, or every image of a plain folder."""
    if isinstance(data, ImageDataset):
        return list(data.samples)
    if not isinstance(data, (str, os.PathLike)):
        samples = list(data)
        if not samples:
            raise DataError("no training samples given")
        return samples
    path = resolve_category(data, category)
    if _is_category(path):
        return mvtec_samples(path, "train")
    if path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        return folder_samples(path, category=path.name)
    raise DataError(f"{path}: neither an MVTec-layout category (train/good) nor a folder of images")


def labelled_samples(data: str | os.PathLike, category: str | None = None, image_level_only: bool = False) -> list[Sample]:
    """Labelled test images of an MVTec-layout category (``test/<defect>`` + ``ground_truth``)."""
    path = resolve_category(data, category)
    if not _is_category(path):
        raise DataError(f"{path}: not an MVTec-layout category (expected test/ and ground_truth/ folders); "
                        "for a plain folder use --good/--defects/--masks")
    return mvtec_samples(path, "test", image_level_only=image_level_only)
