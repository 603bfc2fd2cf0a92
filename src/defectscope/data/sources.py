"""Turning what a user points at (a folder, a dataset, a list of samples) into samples."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

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


def training_samples(
    data: str | os.PathLike | ImageDataset | Iterable[Sample], category: str | None = None
) -> list[Sample]:
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


def labelled_samples(
    data: str | os.PathLike, category: str | None = None, image_level_only: bool = False
) -> list[Sample]:
    """Labelled test images of an MVTec-layout category (``test/<defect>`` + ``ground_truth``)."""
    path = resolve_category(data, category)
    if not _is_category(path):
        raise DataError(
            f"{path}: not an MVTec-layout category (expected test/ and ground_truth/ folders); "
            "for a plain folder use --good/--defects/--masks"
        )
    return mvtec_samples(path, "test", image_level_only=image_level_only)


def resolve_categories(
    data: Sequence[str | os.PathLike], category: str | None = None, categories: str | None = None
) -> list[Path]:
    """Category folders for one model: each DATA folder, or ``categories`` ("all" or "a,b") of a root.

    Several folders (or ``categories``) make one unified model over all of them; category names
    must then be distinct, since results are reported per category name.
    """
    if not data:
        raise DataError("no data folder given")
    if categories is not None:
        if category is not None:
            raise DataError("use either --category or --categories, not both")
        found: list[Path] = []
        for root in map(lambda d: Path(d).expanduser(), data):
            available = _categories_in(root)
            if not available:
                raise DataError(f"{root}: holds no category folders (a category has train/good or test + ground_truth)")
            if categories.strip() == "all":
                found += available
                continue
            by_name = {p.name: p for p in available}
            for name in (n.strip() for n in categories.split(",") if n.strip()):
                if name not in by_name:
                    raise DataError(f"{root / name}: no such category (found: {', '.join(by_name)})")
                found.append(by_name[name])
    else:
        found = [resolve_category(d, category) for d in data]
    names = [p.name for p in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(
            f"category name {duplicates[0]!r} appears twice "
            f"({', '.join(str(p) for p in found if p.name == duplicates[0])}); "
            "categories of one model need distinct names"
        )
    return found


def pick_labelled_defects(
    category_dirs: Sequence[Path], k: int, seed: int = 0, source: str | os.PathLike | None = None
) -> list[Sample]:
    """``k`` defect images with masks per category, chosen with ``seed``.

    They come from ``source`` (a category folder, or a root holding folders of the same category
    names) when given, else from each category's own test split; whoever evaluates must then leave
    them out (the CLI does, using the paths recorded in the model).
    """
    if k < 1:
        raise DataError(f"--labelled-defects must be at least 1, got {k}")
    picked: list[Sample] = []
    for category_dir in category_dirs:
        where = category_dir
        if source is not None:
            root = Path(source).expanduser()
            where = root / category_dir.name if (root / category_dir.name).is_dir() else root
            if len(category_dirs) > 1 and where == root:
                raise DataError(
                    f"{root}: labelled defects for several categories need a root with one folder per "
                    f"category (missing {root / category_dir.name})"
                )
        candidates = sorted(
            (s for s in labelled_samples(where) if s.label == 1 and s.mask_path is not None), key=lambda s: str(s.path)
        )
        if len(candidates) < k:
            raise DataError(f"{where}: {len(candidates)} defect images with masks, fewer than the {k} requested")
        rng = random.Random(f"{seed}:{category_dir.name}")
        picked += [replace(s, category=category_dir.name) for s in rng.sample(candidates, k)]
    return picked
