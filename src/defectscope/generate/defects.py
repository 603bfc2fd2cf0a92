"""The labelled defects a generator learns from, per defect type, and the paper's split.

AnomalyDiffusion's protocol (Hu et al. 2024, Table 2) learns each defect type from the first
third of its defect images (sorted by file name) and evaluates on the other two thirds; the
same split is used everywhere here so that a generator never sees an evaluation image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.sources import labelled_samples, resolve_category
from ..errors import DataError


@dataclass(frozen=True, slots=True)
class DefectExample:
    """One labelled defect image, its ground-truth mask and its defect type."""

    image: Path
    mask: Path
    defect_type: str


def defect_examples(data: str | os.PathLike[str], category: str | None = None) -> dict[str, list[DefectExample]]:
    """Every labelled defect of an MVTec-layout category, per defect type (types and files sorted).

    A defect image without a mask is a DataError: a generator needs the region of every defect.
    """
    folder = resolve_category(data, category)
    by_type: dict[str, list[DefectExample]] = {}
    for sample in labelled_samples(folder):
        if sample.label != 1:
            continue
        if sample.mask_path is None:
            raise DataError(f"{sample.path}: defect image without a ground-truth mask; a generator needs its region")
        by_type.setdefault(sample.defect_type, []).append(
            DefectExample(sample.path, sample.mask_path, sample.defect_type)
        )
    if not by_type:
        raise DataError(f"{folder}: no labelled defect images under test/<defect type>/ with ground_truth/ masks")
    return {name: sorted(by_type[name], key=lambda e: e.image.name) for name in sorted(by_type)}


def learning_count(n: int, share: float = 1 / 3) -> int:
    """How many of ``n`` sorted defect images are learnt from: ``floor(n * share)``, at least 1."""
    if n < 2:
        raise DataError(f"a defect type needs at least 2 labelled images to split (learn / evaluate), got {n}")
    return min(n - 1, max(1, int(n * share)))


def split_examples(
    examples: Sequence[DefectExample], share: float = 1 / 3
) -> tuple[list[DefectExample], list[DefectExample]]:
    """(learn, held out): the first ``learning_count`` examples in file-name order, and the rest."""
    ordered = sorted(examples, key=lambda e: e.image.name)
    k = learning_count(len(ordered), share)
    return ordered[:k], ordered[k:]


def first_examples(
    by_type: dict[str, list[DefectExample]], k: int | None = None, share: float = 1 / 3
) -> dict[str, list[DefectExample]]:
    """Per type, the first ``k`` examples (sorted), or the learning share of the split when ``k`` is None."""
    if k is not None and k < 1:
        raise DataError(f"--labelled-defects must be at least 1, got {k}")
    chosen = {}
    for name, examples in by_type.items():
        ordered = sorted(examples, key=lambda e: e.image.name)
        chosen[name] = ordered[:k] if k is not None else split_examples(ordered, share)[0]
    return chosen
