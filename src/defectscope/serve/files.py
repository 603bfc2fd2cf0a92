"""The inspection log's files: images, masks and anomaly maps, stored by content.

A file lives at ``<root>/<sha256[:2]>/<sha256><suffix>``, written atomically and durably once
(storing the same bytes again only marks it as in use). Only such names are accepted, so no name
can reach outside the folder.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from hashlib import sha256
from pathlib import Path

from ..data.image_io import IMAGE_EXTENSIONS
from ..errors import DefectscopeError
from ..outputs import atomic_write, fsync_dir, make_folder
from .log_records import one_line

#: Suffixes of stored files: the image formats defectscope reads, and ``.npy`` anomaly maps.
STORED_SUFFIXES = frozenset(IMAGE_EXTENSIONS | {".npy"})
_SUFFIX_LIST = " ".join(sorted(STORED_SUFFIXES))
_FILE_NAME = re.compile(r"[0-9a-f]{64}(\.[a-z]{3,4})")


class FileStore:
    """Files named by their SHA-256 under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        """Where the stored file ``name`` (``<64 hex><suffix>``) lives; any other name is refused."""
        match = _FILE_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None or match.group(1) not in STORED_SUFFIXES:
            raise DefectscopeError(f"{one_line(repr(name), 100)}: not a stored file name (<sha256><suffix>)")
        return self.root / name[:2] / name

    def store(self, data: bytes, suffix: str) -> str:
        """Store ``data`` under its SHA-256 (atomically and durably, once); returns its name ``<sha256><suffix>``."""
        suffix = suffix.lower()
        if suffix not in STORED_SUFFIXES:
            raise DefectscopeError(
                f"{one_line(repr(suffix), 40)}: cannot store files of this kind (expected {_SUFFIX_LIST})"
            )
        name = sha256(data).hexdigest() + suffix
        path = self.path(name)
        try:
            os.utime(path)  # already there: mark it as in use now, so a running purge keeps it
            return name
        except FileNotFoundError:
            pass
        except OSError:
            if path.is_file():
                return name
        new_folder = not path.parent.is_dir()
        make_folder(path.parent, "stored images")
        if new_folder:
            fsync_dir(path.parent.parent)
        atomic_write(path, data)
        fsync_dir(path.parent)  # the name is durable before any row names it
        return name

    def require(self, name: str, what: str) -> None:
        """Refuse ``name`` unless it is a stored file (``what`` says what it is for)."""
        if not self.path(name).is_file():
            raise DefectscopeError(f"{name}: {what} is not a stored file (store it with store_file first)")

    def remove_if_unused(self, name: str, cutoff: datetime, referenced: Callable[[str], bool]) -> None:
        """Delete a stored file that was not stored again since ``cutoff`` and that no row names
        (``referenced``). It is first renamed aside, so a concurrent :meth:`store` either touched
        it before (it is then kept) or writes it anew."""
        try:
            path = self.path(name)
        except DefectscopeError:
            return  # not a name this log writes: nothing of ours to delete
        aside = path.with_name(f".{name}.{uuid.uuid4().hex}.purge")
        try:
            os.rename(path, aside)
        except OSError:
            return
        keep = True
        try:
            keep = aside.stat().st_mtime >= cutoff.timestamp() or referenced(name)
        finally:
            if keep:
                os.replace(aside, path)
            else:
                aside.unlink(missing_ok=True)
