"""Assertions and settings shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from defectscope.errors import DataError

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


@contextmanager
def raises_naming(path: Path, *fragments: str) -> Iterator[None]:
    """Expect a one-line DataError whose message names ``path`` and contains ``fragments``."""
    with pytest.raises(DataError) as info:
        yield
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
