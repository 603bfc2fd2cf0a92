"""Dataset folder layouts and command-line inputs -> sorted lists of image files and samples.

Listing is strict so that data is never skipped silently: a missing folder, an empty training
set, a stray non-image file, a subfolder inside an image folder, a special file (FIFO, socket,
device), a dangling symlink or symlink loop, an unreadable file, a mask-like file among the
good images or a defect image without its mask is a :class:`DataError` naming the path. Only
the names in :data:`IGNORED_NAMES` and hidden dot-files (``.DS_Store``, ``._*`` …) are left
out, everywhere, because file browsers and archivers create them unasked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .image_io import IMAGE_EXTENSIONS

#: File and folder names never read as data (compared case-insensitively), besides dot-files:
#: Windows thumbnail caches and folder settings, and the resource folders macOS archives add.
IGNORED_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"})
_MASK_EXTENSIONS = (".png", *sorted(IMAGE_EXTENSIONS - {".png"}))
_ALLOWED = " ".join(sorted(IMAGE_EXTENSIONS))


def is_ignored_name(name: str) -> bool:
    """True for hidden dot-files and :data:`IGNORED_NAMES`: metadata, never images."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


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
    """Sorted folder entries, leaving out the ignored names (see :func:`is_ignored_name`)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror})") from None
    return [folder / name for name in names if not is_ignored_name(name)]


def _kind(path: Path) -> str:
    """``"file"`` or ``"folder"`` (following symlinks), or a DataError saying what else ``path`` is."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path}: symlink loop (the link points back to itself)") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and path.is_symlink():
            raise DataError(f"{path}: dangling symlink (its target {os.readlink(path)} does not exist)") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(f"{path}: no such file or folder") from None
        raise DataError(f"{path}: cannot access ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    special = {
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    what = next((name for test, name in special.items() if test(mode)), "not a regular file")
    raise DataError(f"{path}: {what}, not an image file")


def _check_image_file(path: Path) -> None:
    """A regular, readable file with an image extension, or a DataError naming ``path``."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{path}: not an image file (expected one of {_ALLOWED})")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: cannot read file (permission denied)")


def _list_images(folder: Path, subfolder_hint: str = "subfolders are not read") -> list[Path]:
    """The image files of a folder, sorted by name; anything else in it is an error.

    Folders are not walked: a subfolder is an error whose message ends with ``subfolder_hint``
    (where ``{sub}`` stands for the subfolder's path).
    """
    images = _visible_entries(folder)
    for path in images:
        if _kind(path) == "folder":
            looks_like = (
                f" (a folder named like a {path.suffix} image)" if path.suffix.lower() in IMAGE_EXTENSIONS else ""
            )
            hint = subfolder_hint.format(sub=path)
            raise DataError(f"{path}: unexpected folder inside image folder {folder}{looks_like}; {hint}")
        _check_image_file(path)
    return images


def _reject_masks(images: list[Path], folder: Path) -> None:
    """Good images must not include ground-truth masks: they would be scored as good parts."""
    for path in images:
        if path.stem.lower().endswith("_mask"):
            raise DataError(
                f"{path}: looks like a ground-truth mask inside the good images of {folder}; "
                "masks go in ground_truth/<defect type>/ (or the --masks folder), rename the file if it is an image"
            )


def image_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The image files named by ``paths`` (files and folders), for scoring: the same rules as datasets.

    A folder gives its images sorted by name; folders are not walked recursively, so a subfolder
    is an error (name it too to score its images). Every other entry must be a readable regular
    file with an image extension: a FIFO, socket or device, a dangling symlink, a symlink loop,
    a folder named like an image or an unreadable file stops with a one-line DataError naming it.
    Ignored names (:func:`is_ignored_name`: dot-files, ``Thumbs.db``, ``desktop.ini``,
    ``__MACOSX``) are left out, also when named directly, so ``folder/*`` behaves like
    ``folder``; when nothing else is left that is an error naming them. Only a hidden folder
    named directly (``imgs/.staging``) is listed, since no shell pattern names one unasked. A
    file named twice (directly, through a folder or through a symlink) is listed once, where it
    first appears. Paths are absolute but symlinks are kept, so results show the names the user
    gave.
    """
    if not paths:
        raise DataError("no image files or folders given")
    files: list[Path] = []
    ignored: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for raw in paths:
        path = _absolute(Path(raw).expanduser())
        kind = _kind(path)
        if is_ignored_name(path.name) and not (kind == "folder" and path.name.startswith(".")):
            ignored.append(path)
            continue
        if kind == "folder":
            found = _list_images(path, "folders are not searched recursively, name {sub} as well to include its images")
            if not found:
                raise DataError(f"{path}: folder holds no images (expected one of {_ALLOWED})")
        else:
            _check_image_file(path)
            found = [path]
        for file in found:
            info = file.stat()
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                files.append(file)
    if not files:
        names = ", ".join(str(p) for p in ignored)
        raise DataError(
            f"{names}: ignored file name(s) (hidden files, Thumbs.db, desktop.ini); no images left to score"
        )
    return files


def _require_images(folder: Path, layout_hint: str) -> list[Path]:
    """Images of a folder that must exist and must not be empty."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found ({layout_hint})")
    images = _list_images(folder)
    if not images:
        raise DataError(f"{folder}: no images in folder ({layout_hint})")
    return images


def _mask_index(mask_dir: Path | None) -> dict[tuple[str, str], Path]:
    """(stem, lower-case extension) -> mask path for every mask in ``mask_dir`` (listed as strictly as images)."""
    if mask_dir is None or not mask_dir.is_dir():
        return {}
    masks = _list_images(mask_dir, "masks go directly in the mask folder of their defect type")
    return {(p.stem, p.suffix.lower()): p for p in masks}


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
        good = root / "train" / "good"
        images = _require_images(good, "expected good training images in <category>/train/good/")
        _reject_masks(images, good)
        return [Sample(path, 0, "good", None, category) for path in images]

    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: folder not found (expected <category>/test/<defect type>/<images>)")
    samples: list[Sample] = []
    for folder in _visible_entries(test_dir):
        if _kind(folder) != "folder":
            raise DataError(f"{folder}: unexpected file in test folder (test images go in test/<defect type>/)")
        images = _list_images(folder)
        if folder.name == "good":
            _reject_masks(images, folder)
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
    good_images = _require_images(good, "expected good images")
    _reject_masks(good_images, good)
    samples = [Sample(path, 0, "good", None, category) for path in good_images]
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
