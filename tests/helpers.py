"""Assertions and settings shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from defectscope.errors import DataError
from defectscope.records import Record

#: A small, fast DMAD (a few seconds on 2 cores): test_dmad.py, and the fit on exported feedback.
DMAD_SMALL = {
    "image_size": 64,
    "synthetic_images": 16,
    "anomaly_bank_size": 256,
    "defect_views": 4,
    "croppaste_images": 4,
    "max_train_patches": 2000,
    "epochs": 3,
    "patch_batch": 256,
}

#: The smallest DMAD that fits at all (the contract and export tests: about a second).
DMAD_TINY = {
    "image_size": 64,
    "synthetic_images": 8,
    "anomaly_bank_size": 128,
    "defect_views": 2,
    "croppaste_images": 2,
    "max_train_patches": 500,
    "epochs": 1,
    "patch_batch": 256,
}


@contextmanager
def raises_naming(path: Path, *fragments: str) -> Iterator[None]:
    """Expect a one-line DataError whose message names ``path`` and contains ``fragments``."""
    with pytest.raises(DataError) as info:
        yield
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def labelled_records(good: list[float], defects: dict[str, list[float]], threshold: float | None) -> list[Record]:
    """Test records of good images with scores ``good`` and of each defect type with its scores."""
    records = [
        Record.of(f"good/{i:03d}.png", "c", s, s, threshold, label=0, defect_type="good") for i, s in enumerate(good)
    ]
    records += [
        Record.of(f"{kind}/{i:03d}.png", "c", s, s, threshold, label=1, defect_type=kind)
        for kind, scores in defects.items()
        for i, s in enumerate(scores)
    ]
    return records
