"""Watch a drop folder: judge each new image once it is complete, log it like the service, optionally sort it.

A camera (or the PC behind it) writes images into a folder. :class:`FolderWatcher` polls that
folder (no inotify: it works the same on network shares and every OS) and runs each new image
through the service's own pipeline (:meth:`ServedModel.decode`, :meth:`~ServedModel.predict`,
:meth:`~ServedModel.record`), so a watched image and a posted image get the same score, verdict
and log row.

When a file is complete
    A file is taken once its size, modification time and inode were the same at two polls in a
    row: a camera still writing it changes one of them between polls. An empty file waits
    :data:`EMPTY_GRACE_S` seconds longer (writers often create the file before the first byte).
    Writers that can should write under a temporary name and rename the finished file into the
    folder: temporary names (dot-files, ``*.tmp``, ``*.part``, and the metadata names of
    :func:`~defectscope.data.is_ignored_name`) are never touched, and a rename is atomic, so a
    renamed-in file is never seen half-written (it is still taken at the second poll that sees
    it: a poll cannot tell a rename from a write that has just begun). A writer that stalls for
    longer than the poll interval in the middle of a file is the one case the size check cannot
    catch; a truncated PNG, JPEG, BMP or TIFF then fails to decode and is reported (and sorted
    into ``error/``) instead of judged. With ``once`` the watcher waits at most
    :data:`ONCE_WAIT_S` for files still being written, then leaves them and says so.

What happens to a file
    An image is logged (its bytes and anomaly map stored by content hash, one row committed)
    before it is reported, and with ``sort`` it is then moved into ``good/``, ``anomalous/`` or
    ``error/`` (verdict ``error``: a non-finite score). A file that cannot be used (not an
    image, undecodable, over the pixel or byte limit, a symlink, FIFO or device) is reported
    with the one-line message the CLI gives for it, is not logged, and with ``sort`` goes to
    ``error/``. Nothing is deleted and nothing is overwritten: a name already taken in the
    sub-folder gets a suffix (``000-1.png``). Without ``sort`` files stay where they are and are
    remembered, so each is judged once per watcher (a file replaced under the same name is new).
    Sub-folders of the watched folder are not read.

Crash safety: the row is committed before the file moves, so a watcher killed in between judges
that file again when restarted (a second row), and never loses one.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import is_ignored_name
from ..data.layouts import image_files
from ..errors import DataError, DefectscopeError, OutputError
from ..outputs import fsync_dir, make_folder
from .registry import Decoded, ServedModel, clean_filename
from .settings import DEFAULT_MAX_UPLOAD_BYTES

if TYPE_CHECKING:
    from .store import Inspection, InspectionLog

#: Name endings of files still being written by their writer (compared case-insensitively).
TEMPORARY_SUFFIXES = (".tmp", ".part")
#: Sub-folders ``sort`` moves files into, by verdict (files that cannot be used go to ``error``).
SORT_FOLDERS = {"good": "good", "anomalous": "anomalous", "error": "error"}
#: Extra seconds an empty file must stay empty before it is taken (and reported as empty).
EMPTY_GRACE_S = 10.0
#: With ``once``, how long the watcher waits for files still being written before it leaves them.
ONCE_WAIT_S = 60.0


def is_temporary(name: str) -> bool:
    """True for names the watcher never touches: dot-files, ``*.tmp``, ``*.part``, ``Thumbs.db`` and the like."""
    return is_ignored_name(name) or name.lower().endswith(TEMPORARY_SUFFIXES)


@dataclass(frozen=True)
class FileState:
    """What one poll saw of a folder entry (``lstat``: a symlink is seen as itself)."""

    size: int
    mtime_ns: int
    inode: int
    mode: int  # the file type bits of st_mode

    @classmethod
    def of(cls, info: os.stat_result) -> FileState:
        return cls(info.st_size, info.st_mtime_ns, info.st_ino, stat.S_IFMT(info.st_mode))


class DropFolder:
    """Which entries of a folder are complete and not handled yet; see the module docstring for the rule.

    ``clock`` (seconds, monotonic) is only used for the grace period of empty files.
    """

    def __init__(
        self, folder: Path, *, empty_grace_s: float = EMPTY_GRACE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.folder = folder
        self.empty_grace_s = empty_grace_s
        self._clock = clock
        self._pending: dict[str, tuple[FileState, float]] = {}  # name -> (state, when first seen so)
        self._handled: dict[str, FileState] = {}  # name -> state it was handled in (left in place)

    @property
    def n_pending(self) -> int:
        """Entries seen but not complete yet."""
        return len(self._pending)

    def pending(self) -> list[Path]:
        """The entries seen but not complete yet, sorted by name."""
        return sorted(self.folder / name for name in self._pending)

    def poll(self) -> list[tuple[Path, FileState]]:
        """The entries complete at this poll and not handled yet, sorted by name."""
        now = self._clock()
        try:
            with os.scandir(self.folder) as listing:
                entries = [(e.name, e.path, e.stat(follow_symlinks=False)) for e in listing if not is_temporary(e.name)]
        except FileNotFoundError:
            raise DataError(f"{self.folder}: the watched folder is gone") from None
        except OSError as exc:
            raise DataError(f"{self.folder}: cannot list the watched folder ({exc.strerror})") from None
        ready: list[tuple[Path, FileState]] = []
        pending: dict[str, tuple[FileState, float]] = {}
        present: set[str] = set()
        for name, path, info in entries:
            if stat.S_ISDIR(info.st_mode):
                continue
            state = FileState.of(info)
            present.add(name)
            if self._handled.get(name) == state:
                continue
            earlier = self._pending.get(name)
            since = earlier[1] if earlier is not None and earlier[0] == state else now
            if earlier is not None and earlier[0] == state and (state.size > 0 or now - since >= self.empty_grace_s):
                ready.append((Path(path), state))
            else:
                pending[name] = (state, since)
        self._pending = pending
        self._handled = {name: state for name, state in self._handled.items() if name in present}
        return sorted(ready, key=lambda item: item[0].name)

    def handled(self, path: Path, state: FileState) -> None:
        """Remember ``path`` as handled in ``state``: it is not taken again unless it changes."""
        self._handled[path.name] = state

    def changed(self, path: Path, state: FileState) -> None:
        """``path`` was found in ``state`` when it was read, not as polled: wait for it to settle again."""
        self._pending[path.name] = (state, self._clock())


@dataclass(frozen=True)
class WatchEvent:
    """What became of one file: logged (``inspection``) or refused (``problem``), and where ``sort`` put it."""

    path: Path
    inspection: Inspection | None = None
    problem: str | None = None
    moved_to: Path | None = None


@dataclass
class WatchCounts:
    """Files handled by a watcher so far."""

    inspected: int = 0
    errors: int = 0  # inspected with the verdict error (a non-finite score)
    refused: int = 0  # could not be used at all
    verdicts: dict[str, int] = field(default_factory=dict)

    def add(self, event: WatchEvent) -> None:
        if event.inspection is None:
            self.refused += 1
            return
        self.inspected += 1
        verdict = event.inspection.verdict or "none"  # no threshold: no verdict
        self.errors += verdict == "error"
        self.verdicts[verdict] = self.verdicts.get(verdict, 0) + 1


class _Changed(Exception):
    """The file was not as polled when it was read (still being written): try it again later."""

    def __init__(self, state: FileState) -> None:
        super().__init__("changed")
        self.state = state


def _refuse_special(path: Path, state: FileState) -> None:
    """A one-line DataError for a symlink; other checks are :func:`image_files`' (the CLI's messages)."""
    if stat.S_ISLNK(state.mode):
        raise DataError(f"{path}: symbolic link; the watcher takes regular files only (move the file itself in)")
    image_files([path])  # not a regular file, not an image extension, unreadable: the CLI's one-line errors


def _read(path: Path, state: FileState, max_bytes: int) -> bytes:
    """The bytes of a regular file as it was polled, or :class:`_Changed`; never follows a link or blocks on a FIFO."""
    _refuse_special(path, state)
    if state.size > max_bytes:
        raise DataError(
            f"{path}: file is {state.size} bytes, over the limit of {max_bytes} (the service's upload limit)"
        )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _Changed(state) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink since the poll
            raise _Changed(state) from None
        raise DataError(f"{path}: cannot read file ({exc.strerror})") from None
    try:
        now = FileState.of(os.fstat(fd))
        if now != state:
            raise _Changed(now)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
        after = FileState.of(os.fstat(fd))
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if after != state or len(data) != state.size:
        raise _Changed(after)
    return data


def _path_message(exc: DefectscopeError, path: Path) -> str:
    """The error's message naming the full path (the decoder names only the file's base name)."""
    text = str(exc)
    name = clean_filename(path.name) or "upload"
    return f"{path}{text[len(name) :]}" if text.startswith(f"{name}:") else text


def move_into(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder`` without replacing anything there: ``name-1.ext``, ``name-2.ext``... on a clash.

    A hard link plus unlink refuses an existing target atomically; where the file system has no
    hard links the target is checked, then renamed to (a race with another writer of that same
    sub-folder is the only way to lose that check).
    """
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    number = 0
    while True:
        target = folder / (path.name if number == 0 else f"{stem}-{number}{suffix}")
        number += 1
        try:
            os.link(path, target, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS):
                raise OutputError(f"{path}: cannot move into {folder} ({exc.strerror})") from None
            if os.path.lexists(target):
                continue
            try:
                os.rename(path, target)
            except OSError as err:
                raise OutputError(f"{path}: cannot move into {folder} ({err.strerror})") from None
        else:
            try:
                os.unlink(path)
            except OSError as exc:
                raise OutputError(f"{path}: moved a copy into {folder} but cannot remove it ({exc.strerror})") from None
        fsync_dir(folder)
        fsync_dir(path.parent)
        return target


def watched_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as an absolute path (symlinks kept, as the user named it), or a one-line DataError."""
    path = Path(os.path.abspath(Path(folder).expanduser()))
    if not path.is_dir():
        raise DataError(f"{path}: {'not a folder' if path.exists() else 'folder not found'} (the folder to watch)")
    return path


def check_sortable(model: ServedModel) -> None:
    """Sorting needs verdicts: a model without a calibrated threshold gives none."""
    if model.threshold is None:
        raise DefectscopeError(
            f"{model.run}: this model has no calibrated threshold, so it gives no verdict to sort by; "
            "watch without --sort, or fit it on at least 2 good images"
        )


class FolderWatcher:
    """Judges the images that appear in ``folder`` with one served model and logs them in ``log``.

    ``sort`` moves each file into ``good/``, ``anomalous/`` or ``error/`` under ``folder`` (made
    here; a model without a threshold gives no verdict, so cannot sort). ``max_bytes`` is the
    largest file read (the service's upload limit by default); ``batch_size`` caps the images
    one model call takes (default: the run's).
    """

    def __init__(
        self,
        model: ServedModel,
        log: InspectionLog,
        folder: str | os.PathLike[str],
        *,
        sort: bool = False,
        max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        batch_size: int | None = None,
        empty_grace_s: float = EMPTY_GRACE_S,
    ) -> None:
        path = watched_folder(folder)
        if sort:
            check_sortable(model)
        self.model = model
        self.log = log
        self.folder = path
        self.sort = sort
        self.max_bytes = max_bytes
        self.batch_size = batch_size or model.detector.batch_size
        self.drop = DropFolder(path, empty_grace_s=empty_grace_s)
        self.counts = WatchCounts()
        if sort:
            for name in SORT_FOLDERS.values():
                make_folder(path / name, f"the sorted {name} images")

    def step(
        self, on_event: Callable[[WatchEvent], None] | None = None, stop: threading.Event | None = None
    ) -> list[WatchEvent]:
        """One poll: judge, log and (with ``sort``) move every file that is complete now, a batch at a time.

        ``on_event`` is told of each file as soon as its batch is done; once ``stop`` is set no
        further batch starts (the files left are taken by a later watcher).
        """
        events: list[WatchEvent] = []
        ready = self.drop.poll()
        for start in range(0, len(ready), self.batch_size):
            if stop is not None and stop.is_set():
                break
            for event in self._judge(ready[start : start + self.batch_size]):
                self.counts.add(event)
                events.append(event)
                if on_event is not None:
                    on_event(event)
        return events

    def run(
        self,
        on_event: Callable[[WatchEvent], None],
        *,
        interval: float = 0.5,
        once: bool = False,
        stop: threading.Event | None = None,
        once_wait_s: float = ONCE_WAIT_S,
    ) -> WatchCounts:
        """Poll every ``interval`` seconds until ``stop`` is set.

        With ``once``, until no file is left to settle; files still changing after ``once_wait_s``
        are left where they are, each reported as a problem. ``on_event`` is told of each file as
        soon as its batch is done (see :meth:`step`).
        """
        stop = stop or threading.Event()
        started = time.monotonic()
        while not stop.is_set():
            self.step(on_event, stop)
            if once and not self.drop.n_pending:
                break
            if once and time.monotonic() - started > once_wait_s:
                for path in self.drop.pending():
                    event = WatchEvent(
                        path, problem=f"{path}: still being written after {once_wait_s:g} s; left as it is"
                    )
                    self.counts.add(event)
                    on_event(event)
                break
            stop.wait(interval)
        return self.counts

    # -- one batch ----------------------------------------------------------------------------------
    def _judge(self, files: list[tuple[Path, FileState]]) -> list[WatchEvent]:
        """Read and decode ``files``, score the usable ones in one model call, log, sort."""
        started: dict[Path, float] = {}
        decoded: list[tuple[Path, FileState, Decoded]] = []
        refused: dict[Path, str] = {}
        for path, state in files:
            started[path] = time.perf_counter()
            try:
                data = _read(path, state, self.max_bytes)
                decoded.append((path, state, self.model.decode(data, path.name)))
            except _Changed as changed:
                self.drop.changed(path, changed.state)
            except DataError as exc:
                refused[path] = _path_message(exc, path)
        inspections: dict[Path, Inspection] = {}
        if decoded:
            begin = time.perf_counter()
            results = self.model.score([item for _, _, item in decoded])
            model_ms = (time.perf_counter() - begin) * 1000.0
            for (path, _, item), (score, amap) in zip(decoded, results):
                queue_ms = max(0.0, (begin - started[path]) * 1000.0 - item.decode_ms)
                timings = {"decode_ms": item.decode_ms, "queue_ms": queue_ms, "model_ms": model_ms}
                inspections[path] = self.model.record(item, score, amap, self.log, timings, started[path])
        events: list[WatchEvent] = []
        states = dict(files)
        for path, _ in files:
            if path in inspections:
                verdict = inspections[path].verdict or "none"
                events.append(
                    WatchEvent(path, inspection=inspections[path], moved_to=self._place(path, states, verdict))
                )
            elif path in refused:
                events.append(WatchEvent(path, problem=refused[path], moved_to=self._place(path, states, "error")))
        return events

    def _place(self, path: Path, states: dict[Path, FileState], verdict: str) -> Path | None:
        """Move a handled file into its sub-folder (``sort``), or remember it where it is."""
        if not self.sort:
            self.drop.handled(path, states[path])
            return None
        return move_into(path, self.folder / SORT_FOLDERS.get(verdict, "error"))
