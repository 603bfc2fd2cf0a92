"""The data of the localiser protocol: the split of a category and the (image, mask) pairs of a source.

Per defect type the first third of the defect images (sorted by file name, :mod:`.defects`) is
what generators and Crop&Paste learn from; the other two thirds plus the category's good test
images are the evaluation set, and the good training images train every localiser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..data import Sample
from ..data.sources import labelled_samples, resolve_category, training_samples
from ..errors import DataError
from .defects import DefectExample, defect_examples, first_examples


@dataclass(frozen=True)
class LocaliserSplit:
    """One category split for the localiser protocol."""

    category: Path
    good: list[Sample]  # train/good: the all-zero-mask images of every localiser
    learn: dict[str, list[DefectExample]]  # per defect type, the learning third
    evaluation: list[Sample]  # the held-out defects and test/good

    @property
    def n_learn(self) -> int:
        """How many defect images are learnt from, over all types."""
        return sum(len(examples) for examples in self.learn.values())


def localiser_split(data: str | os.PathLike[str], category: str | None = None, share: float = 1 / 3) -> LocaliserSplit:
    """The split of an MVTec-layout category: learning defects per type, evaluation samples, good training images."""
    folder = resolve_category(data, category)
    learn = first_examples(defect_examples(folder), share=share)
    learnt = {e.image for examples in learn.values() for e in examples}
    evaluation = [s for s in labelled_samples(folder) if s.path not in learnt]
    return LocaliserSplit(folder, training_samples(folder), learn, evaluation)


def learning_folder(split: LocaliserSplit, root: str | os.PathLike[str]) -> Path:
    """An MVTec-layout folder under ``root`` holding only the learning defects (symlinks), e.g. for Crop&Paste.

    Its ``test/<type>/`` and ``ground_truth/<type>/`` link to the original images and masks;
    ``root`` must not hold a folder of the category's name yet.
    """
    folder = Path(root) / split.category.name
    if folder.exists():
        raise DataError(f"{folder}: exists already; choose an empty folder for the learning defects")
    for defect_type, examples in split.learn.items():
        images, masks = folder / "test" / defect_type, folder / "ground_truth" / defect_type
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for example in examples:
            (images / example.image.name).symlink_to(example.image.resolve())
            (masks / example.mask.name).symlink_to(example.mask.resolve())
    return folder


def folder_pairs(folder: str | os.PathLike[str], count: int | None = None) -> list[tuple[Path, Path]]:
    """The (image, mask) pairs of an MVTec-layout folder (``test/<type>/`` + ``ground_truth/<type>/``).

    With ``count``, that many taken in turn from each type (types and files sorted), so every type
    is represented alike; a folder holding fewer pairs is a DataError.
    """
    by_type: dict[str, list[tuple[Path, Path]]] = {}
    for sample in labelled_samples(folder):
        if sample.label == 1 and sample.mask_path is not None:
            by_type.setdefault(sample.defect_type, []).append((sample.path, sample.mask_path))
    total = sum(len(pairs) for pairs in by_type.values())
    if total == 0:
        raise DataError(f"{folder}: no defect images with masks under test/<type>/ and ground_truth/<type>/")
    if count is None:
        return [pair for name in sorted(by_type) for pair in by_type[name]]
    if total < count:
        raise DataError(f"{folder}: holds {total} pairs, fewer than the {count} asked for")
    queues = [iter(by_type[name]) for name in sorted(by_type)]
    chosen: list[tuple[Path, Path]] = []
    while len(chosen) < count:
        for queue in queues:
            pair = next(queue, None)
            if pair is not None and len(chosen) < count:
                chosen.append(pair)
    return chosen
