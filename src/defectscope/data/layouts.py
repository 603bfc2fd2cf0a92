"""Dataset folder layouts -> sorted lists of :class:`Sample` records.

Listing is strict so that data is never skipped silently: a missing folder, an empty training
set, a stray non-image file or a defect image without its mask is a :class:`DataError` naming
the path. Only hidden dot-files (``.DS_Store``, ``._*`` …) and the Windows metadata files
``Thumbs.db`` / ``desktop.ini`` are ignored, because file browsers create them unasked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from defectscope.data.image_io import IMAGE_EXTENSIONS
from defectscope.errors import DataError

_OS_METADATA_FILES = frozenset({"Thumbs.db", "desktop.ini"})
_MASK_EXTENSIONS = (".png", *sorted(IMAGE_EXTENSIONS - {".png"}))


@dataclass(frozen=True, slots=True)
class Sample:
    """One image of a dataset: where it is, its label and where its ground-truth mask is."""

    path: Path
    label: int  # 0 good, 1 defect
    defect_type: str  # "good" for good images
    mask_path: Path | None  # None for good images and for defects evaluated at image level only
    category: str


def _absolute(path: str | os.PathLike[str]) -> Path:
    """Absolute, normalised path without resolving symlinks, so messages show what the user gave."""
    return Path(os.path.abspath(path))


def _visible_entries(folder: Path) -> list[Path]:
    """Sorted folder entries, leaving out hidden dot-files and OS metadata files."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror})") from None
    return [folder / name for name in names if not name.startswith(".") and name not in _OS_METADATA_FILES]


def _list_images(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name; anything else in it is an error."""
    images = _visible_entries(folder)
    for path in images:
        if path.is_dir():
            raise DataError(f"{path}: unexpected folder inside image folder {folder}")
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            allowed = " ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{path}: not an image file (expected one of {allowed})")
    return images


def _require_images(folder: Path, layout_hint: str) -> list[Path]:
    """Images of a folder that must exist and must not be empty."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found ({layout_hint})")
    images = _list_images(folder)
    if not images:
        raise DataError(f"{folder}: no images in folder ({layout_hint})")
    return images


def _mask_index(mask_dir: Path | None) -> dict[tuple[str, str], Path]:
    """(stem, lower-case extension) -> mask path for every visible file in ``mask_dir``."""
    if mask_dir is None or not mask_dir.is_dir():
        return {}
    return {(p.stem, p.suffix.lower()): p for p in _visible_entries(mask_dir) if p.is_file()}


def _find_mask(index: dict[tuple[str, str], Path], stem: str) -> Path | None:
    """The mask of image ``stem``: ``<stem>_mask.png`` first, then ``<stem>.png``, then other formats."""
    for ext in _MASK_EXTENSIONS:
        for name in (f"{stem}_mask", stem):
            if (name, ext) in index:
                return index[(name, ext)]
    return None


def _defect_samples(
    images: list[Path], defect_type: str, mask_dir: Path | None, image_level_only: bool, category: str
) -> list[Sample]:
    """Defect samples with their masks; a missing mask is an error unless ``image_level_only``."""
    index = _mask_index(mask_dir)
    samples = []
    for path in images:
        mask_path = _find_mask(index, path.stem)
        if mask_path is None and not image_level_only:
            where = f"in {mask_dir}" if mask_dir is not None else "(no mask folder given)"
            raise DataError(
                f"{path}: defect image has no mask {where}, expected {path.stem}_mask.png; "
                "pass image_level_only=True (CLI: --image-level-only) to evaluate image-level metrics only"
            )
        samples.append(Sample(path, 1, defect_type, mask_path, category))
    return samples


def mvtec_samples(category_dir: str | os.PathLike[str], split: str, image_level_only: bool = False) -> list[Sample]:
    """Samples of one split of an MVTec AD / MPDD style category folder.

    Layout: ``<cat>/train/good/*``, ``<cat>/test/<defect type>/*`` (``good`` for good test images)
    and ``<cat>/ground_truth/<defect type>/<stem>_mask.png``. Good images get ``mask_path=None``
    (their mask is all background). ``image_level_only`` allows defect images without masks;
    masks that do exist are still used. Order: by defect-type folder, then file name.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = _absolute(category_dir)
    if not root.is_dir():
        raise DataError(f"{root}: category folder not found")
    category = root.name
    if split == "train":
        images = _require_images(root / "train" / "good", "expected good training images in <category>/train/good/")
        return [Sample(path, 0, "good", None, category) for path in images]

    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: folder not found (expected <category>/test/<defect type>/<images>)")
    samples: list[Sample] = []
    for folder in _visible_entries(test_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: unexpected file in test folder (test images go in test/<defect type>/)")
        images = _list_images(folder)
        if folder.name == "good":
            samples += [Sample(path, 0, "good", None, category) for path in images]
        else:
            mask_dir = root / "ground_truth" / folder.name
            samples += _defect_samples(images, folder.name, mask_dir, image_level_only, category)
    if not samples:
        raise DataError(f"{test_dir}: no test images (expected <category>/test/<defect type>/<images>)")
    return samples


def folder_samples(
    good_dir: str | os.PathLike[str],
    defect_dir: str | os.PathLike[str] | None = None,
    mask_dir: str | os.PathLike[str] | None = None,
    image_level_only: bool = False,
    category: str = "folder",
) -> list[Sample]:
    """Samples from plain folders: good images, optional defect images and their masks.

    A defect image's mask is found in ``mask_dir`` by stem (``<stem>_mask.png``, ``<stem>.png``
    or the same names with any image extension). Defects are typed by their folder's name.
    """
    if mask_dir is not None and defect_dir is None:
        raise ValueError("mask_dir needs defect_dir: masks belong to defect images")
    good = _absolute(good_dir)
    samples = [Sample(path, 0, "good", None, category) for path in _require_images(good, "expected good images")]
    if defect_dir is not None:
        defects = _absolute(defect_dir)
        if not defects.is_dir():
            raise DataError(f"{defects}: defect image folder not found")
        masks = _absolute(mask_dir) if mask_dir is not None else None
        if masks is not None and not masks.is_dir():
            raise DataError(f"{masks}: mask folder not found")
        samples += _defect_samples(_list_images(defects), defects.name, masks, image_level_only, category)
    return samples


def find_categories(root: str | os.PathLike[str]) -> list[Path]:
    """Category folders under ``root``: ``[root]`` when it is one itself, else its subfolders with ``train/good``."""
    root = _absolute(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if (root / "train" / "good").is_dir():
        return [root]
    categories = [p for p in _visible_entries(root) if (p / "train" / "good").is_dir()]
    if not categories:
        raise DataError(f"{root}: no category folders found (a category folder contains train/good/)")
    return categories
