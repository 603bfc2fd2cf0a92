"""Writing results safely: atomic files, output folders that never swallow the user's own files.

Every file defectscope writes goes through :func:`atomic_write` (or :func:`atomic_save_image`):
the bytes go to a temporary file in the same folder, are flushed and fsynced, and the file is
renamed over the target. An existing file is therefore either the old complete one or the new
complete one, also after a crash or a full disk, and no temporary file is left behind.

Output folders carry a marker file (:data:`MARKER`); :func:`prepare_output_dir` refuses a
non-empty folder without it unless ``overwrite`` is given, and checks before any work starts
that the folder can be created and written.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Self

from .errors import OutputError

MARKER = ".defectscope"
#: Permissions of every file written (before the umask), like files made by ``open``.
FILE_MODE = 0o666


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied" if exc.errno != errno.EROFS else "read-only file system"
    return exc.strerror or str(exc)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function writing to a binary handle) to ``path`` atomically.

    Raises :class:`OutputError` naming the file on any write error; the previous content of
    ``path`` is then untouched and the temporary file is removed.
    """
    path = Path(path)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, FILE_MODE & ~_umask())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({_describe(exc)}); any earlier file there is unchanged") from None
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    return path


def json_text(value: Any) -> str:
    """``value`` as indented, strictly valid JSON (no bare NaN / Infinity: those become null)."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> Path:
    """``value`` written atomically as :func:`json_text`."""
    return atomic_write(path, json_text(value))


def atomic_save_image(path: str | os.PathLike[str], image: Any, **save_kwargs: Any) -> Path:
    """Save a PIL image atomically; the format follows the file name's extension."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(Path(path).suffix.lower(), "PNG")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return atomic_write(path, buffer.getvalue())


class StagedFiles:
    """Files replaced together: each is first written in full to a temporary file next to it
    (flushed, fsynced, given :data:`FILE_MODE` less the umask), then :meth:`commit` renames them
    over their targets in the order they were staged.

    Until the commit every target keeps its earlier content, and on any error, or when the
    ``with`` block is left without committing, the temporary files are removed. Where one file
    records another's hash (a model's config and its tensors), stage the recorded file first.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def stage(self, path: str | os.PathLike[str], data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
        """Write ``data`` (as for :func:`atomic_write`) to a temporary file for ``path``; returns its path."""

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                if callable(data):
                    data(handle)
                else:
                    handle.write(data.encode("utf-8") if isinstance(data, str) else data)

        return self.stage_with(path, write)

    def stage_with(self, path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
        """Let ``write(tmp)`` fill a temporary file for ``path`` by name (for libraries that only
        write to a file name); an OSError from it becomes an :class:`OutputError` naming ``path``."""
        path = Path(path)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            self._staged.append((tmp, path))
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, FILE_MODE & ~_umask())
        except OSError as exc:
            self.discard()
            raise OutputError(f"{path}: cannot write ({_describe(exc)}); any earlier file there is unchanged") from None
        return tmp

    def commit(self) -> None:
        """Rename every staged file over its target, in order, syncing the folder after each."""
        while self._staged:
            tmp, path = self._staged[0]
            try:
                os.replace(tmp, path)
            except OSError as exc:
                self.discard()
                raise OutputError(f"{path}: cannot replace ({_describe(exc)})") from None
            self._staged.pop(0)
            fsync_dir(path.parent)

    def discard(self) -> None:
        """Remove the temporary files not committed yet."""
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._staged.clear()


def make_folder(folder: str | os.PathLike[str], what: str) -> Path:
    """Create ``folder`` and its parents if needed; an :class:`OutputError` naming it when that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the folder for {what} ({_describe(exc)})") from None
    return folder


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (best effort: some file systems cannot sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _writable_dir(folder: Path, what: str) -> None:
    """Create ``folder`` (parents included) and check that files can be made in it."""
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise OutputError(f"{existing}: a dangling symbolic link; cannot write {what} there")
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{existing}: not a folder; cannot write {what} under it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write {what} there ({_describe(exc)})") from None


def require_empty_folder(folder: Path) -> None:
    """``folder`` must be missing or an empty folder: an output that never mixes with earlier files."""
    if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
        raise OutputError(f"{folder}: output folder exists and is not empty; choose another --out or remove it")


def prepare_output_dir(
    folder: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    what: str = "results",
    allow: Callable[[Path], bool] | None = None,
) -> Path:
    """Make ``folder`` ready for defectscope output, before any work is done.

    A folder that exists and holds anything must carry the :data:`MARKER` of an earlier
    defectscope output (or satisfy ``allow``), unless ``overwrite``: the user's own files are
    never replaced silently. The marker is written as soon as the folder is accepted.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; choose another output folder")
    if folder.is_dir() and not overwrite and not (folder / MARKER).is_file():
        try:
            entries = [p for p in folder.iterdir()]
        except OSError as exc:
            raise OutputError(f"{folder}: cannot list the output folder ({_describe(exc)})") from None
        if entries and not (allow and allow(folder)):
            raise OutputError(
                f"{folder}: not empty and not a defectscope output folder; choose another folder "
                "or pass --overwrite to write into it anyway"
            )
    _writable_dir(folder, what)
    if not (folder / MARKER).is_file():
        atomic_write(folder / MARKER, f"defectscope {what}\n")
    return folder


def prepare_output_file(path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
    """Check before the work that ``path`` can be written (parent folder exists and is writable)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; expected a file name to write to")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: no such folder (for {path.name}); create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: cannot write {path.name} there (permission denied)")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: cannot be replaced (permission denied)")
    return path
