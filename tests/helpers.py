"""Assertions shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from defectscope.errors import DataError


@contextmanager
def raises_naming(path: Path, *fragments: str) -> Iterator[None]:
    """Expect a one-line DataError whose message names ``path`` and contains ``fragments``."""
    with pytest.raises(DataError) as info:
        yield
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
