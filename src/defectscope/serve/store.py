"""The inspection log: every inspection the service answers, the operator's feedback, and their files.

Rows live in a database through SQLAlchemy 2 Core, a SQLite file by default or PostgreSQL (see
:mod:`defectscope.serve.database`). The schema is created and migrated when the log is opened
(see :mod:`defectscope.serve.migrations`). Every write is committed before the method returns.
The records it returns and how values are cleaned are in :mod:`defectscope.serve.log_records`.

Images and anomaly maps are files under ``data_dir/files``, named by their content and named in
the rows (see :mod:`defectscope.serve.files`). Retention (:meth:`InspectionLog.purge`, run in
the background every hour when ``retention_days`` is given) deletes old rows with their feedback,
then the files no remaining row names.
"""

from __future__ import annotations

import builtins
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import DefectscopeError
from ..outputs import make_folder
from . import migrations
from .database import DEFAULT_DB_NAME, LogUnavailableError, database_url, default_db_url, error_reason
from .database import make_engine as _make_engine  # the tests build engines the way the log does
from .files import FileStore
from .log_records import (
    DEFECT_KINDS,
    FEEDBACK_KINDS,
    VERDICTS,
    Feedback,
    Inspection,
    InspectionIn,
    clean_text,
    feedback_from_row,
    finite,
    inspection_from_row,
    one_line,
    timings_json,
    utc,
)
from .migrations import feedback as feedback_table
from .migrations import inspections as inspections_table

#: What other modules import from here (the log, its records and errors, and its database URL).
__all__ = [
    "DEFAULT_DB_NAME",
    "DEFECT_KINDS",
    "FEEDBACK_KINDS",
    "Feedback",
    "Inspection",
    "InspectionIn",
    "InspectionLog",
    "LogUnavailableError",
    "database_url",
    "default_db_url",
]

#: The most rows :meth:`InspectionLog.list` returns at once.
MAX_LIST = 1000
#: How often the background retention purge runs (when ``retention_days`` is set).
PURGE_INTERVAL_S = 3600.0

_INSPECTION_ID = re.compile(r"[0-9a-f]{32}")
_DEFECT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CHUNK = 500  # ids per IN (...) clause


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class InspectionLog:
    """Inspections, feedback and stored files of the service (see the module docstring).

    Thread-safe: methods may be called from several threads (each takes a pooled connection).
    ``create=False`` refuses to make a new SQLite file or data folder (for readers such as
    ``defectscope feedback export``, where a typo must not yield an empty log).
    """

    def __init__(
        self,
        url: str | None,
        data_dir: str | os.PathLike[str],
        *,
        retention_days: float | None = None,
        create: bool = True,
    ) -> None:
        if retention_days is not None and not (math.isfinite(retention_days) and retention_days > 0):
            raise DefectscopeError(f"retention must be a positive number of days, got {retention_days}")
        self.data_dir = Path(data_dir)
        if create:
            make_folder(self.data_dir, "the inspection log")
        elif not self.data_dir.is_dir():
            raise DefectscopeError(f"{self.data_dir}: no such data folder (where the service keeps its images)")
        self._files = FileStore(self.data_dir / "files")
        self.url = database_url(url, self.data_dir)
        self._password = self.url.password if isinstance(self.url.password, str) else None
        if self.url.get_backend_name() == "sqlite":
            db_file = Path(self.url.database or "")
            self.where = str(db_file)
            if create:
                make_folder(db_file.parent, "the inspection log")
            elif not db_file.is_file():
                raise DefectscopeError(f"{db_file}: no such inspection log (the database file the service writes)")
        else:
            self.where = self.url.render_as_string(hide_password=True).replace("+psycopg", "", 1)
        self._engine = _make_engine(self.url)
        self._writer = self._engine.execution_options(defectscope_write=True)
        try:
            self.version = migrations.migrate(self._writer, self.where)
        except DefectscopeError:
            self._engine.dispose()
            raise
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            self._engine.dispose()
            raise DefectscopeError(
                f"{self.where}: cannot open the inspection log ({error_reason(exc, self._password)})"
            ) from None
        self.retention = timedelta(days=retention_days) if retention_days is not None else None
        #: The message of the last background purge that failed (None when it worked).
        self.last_purge_error: str | None = None
        self._last_purge = -math.inf
        self._purger: threading.Thread | None = None
        self._purge_lock = threading.Lock()
        self._closing = False
        self._maybe_purge()

    # ---- transactions ------------------------------------------------------------------------

    @contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        try:
            with self._engine.connect() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise LogUnavailableError(f"{self.where}: cannot {what} ({error_reason(exc, self._password)})") from None

    @contextmanager
    def _write(self, what: str) -> Iterator[Connection]:
        try:
            with self._writer.begin() as conn:
                yield conn
        except sa.exc.IntegrityError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise LogUnavailableError(f"{self.where}: cannot {what} ({error_reason(exc, self._password)})") from None

    # ---- files -------------------------------------------------------------------------------

    def file_path(self, name: str) -> Path:
        """Where the stored file ``name`` (``<64 hex><suffix>``) lives; any other name is refused."""
        return self._files.path(name)

    def store_file(self, data: bytes, suffix: str) -> str:
        """Store ``data`` under its SHA-256 (atomically and durably, once); returns its name ``<sha256><suffix>``."""
        return self._files.store(data, suffix)

    # ---- inspections -------------------------------------------------------------------------

    def add_inspection(self, row: InspectionIn) -> Inspection:
        """Log one inspection (committed before it returns) and return it as stored."""
        if not isinstance(row.model, str) or not row.model:
            raise DefectscopeError("an inspection needs the name of its model")
        verdict = "none" if row.verdict is None else row.verdict  # records.judge's None, if passed as is
        if verdict not in VERDICTS:
            raise DefectscopeError(f"{row.verdict!r}: not a verdict (expected one of {', '.join(VERDICTS)})")
        self._files.require(row.image, "the inspected image")
        if row.map is not None:
            self._files.require(row.map, "the anomaly map")
        timings = {clean_text(k, "timing") or "": v for k, v in ((k, finite(v)) for k, v in row.timings.items())}
        values: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "created": datetime.now(UTC),
            "model": clean_text(row.model, "model"),
            "model_sha256": clean_text(row.model_sha256, "model_sha256"),
            "filename": clean_text(row.filename, "filename"),
            "image": row.image,
            "map": row.map,
            "score": finite(row.score),
            "normalized_score": finite(row.normalized_score),
            "verdict": verdict,
            "threshold": finite(row.threshold),
            "rule": clean_text(row.rule, "rule"),
            "max_pixel_score": finite(row.max_pixel_score),
            "reason": clean_text(row.reason, "reason"),
        }
        clean = {k: v for k, v in timings.items() if v is not None}
        with self._write("log the inspection") as conn:
            conn.execute(sa.insert(inspections_table).values(**values, timings=timings_json(clean)))
        self._maybe_purge()
        return Inspection(**values, timings=clean, feedback=())

    def _feedback_of(self, conn: Connection, ids: Sequence[str]) -> dict[str, builtins.list[Feedback]]:
        found: dict[str, builtins.list[Feedback]] = {i: [] for i in ids}
        for chunk in _chunks(ids):
            query = (
                sa.select(feedback_table).where(feedback_table.c.inspection_id.in_(chunk)).order_by(feedback_table.c.id)
            )
            for row in conn.execute(query):
                found[row.inspection_id].append(feedback_from_row(row))
        return found

    def _inspections(self, conn: Connection, rows: Sequence[Any]) -> builtins.list[Inspection]:
        feedback = self._feedback_of(conn, [r.id for r in rows])
        return [inspection_from_row(r, feedback[r.id]) for r in rows]

    def get(self, inspection_id: str) -> Inspection | None:
        """The inspection with this id, or None (also for anything that is not an id)."""
        if not isinstance(inspection_id, str) or not _INSPECTION_ID.fullmatch(inspection_id):
            return None
        with self._read("read the inspection") as conn:
            row = conn.execute(sa.select(inspections_table).where(inspections_table.c.id == inspection_id)).first()
            return self._inspections(conn, [row])[0] if row is not None else None

    def list(
        self,
        *,
        model: str | None = None,
        verdict: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[builtins.list[Inspection], int]:
        """Inspections newest first, filtered (``since <= created < until``), one page; and how many match."""
        if not 0 <= limit <= MAX_LIST:
            raise DefectscopeError(f"limit must be between 0 and {MAX_LIST}, got {limit}")
        if offset < 0:
            raise DefectscopeError(f"offset must be 0 or more, got {offset}")
        table = inspections_table
        conditions = []
        if model is not None:
            conditions.append(table.c.model == model)
        if verdict is not None:
            conditions.append(table.c.verdict == verdict)
        if since is not None:
            conditions.append(table.c.created >= utc(since))
        if until is not None:
            conditions.append(table.c.created < utc(until))
        with self._read("list inspections") as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(table).where(*conditions)).scalar_one()
            rows = conn.execute(
                sa.select(table)
                .where(*conditions)
                .order_by(table.c.created.desc(), table.c.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
            return self._inspections(conn, rows), int(total)

    def verdict_counts(self) -> dict[str, dict[str, int]]:
        """model -> {verdict: how many of its inspections the log holds with that verdict}.

        One GROUP BY over the whole log. Models with inspections only; every verdict is listed
        for them (0 where none). A NULL verdict (never written by :meth:`add_inspection`) counts
        as ``none``.
        """
        i = inspections_table
        query = sa.select(i.c.model, i.c.verdict, sa.func.count()).group_by(i.c.model, i.c.verdict)
        counts: dict[str, dict[str, int]] = {}
        with self._read("count inspections") as conn:
            for model, verdict, n in conn.execute(query):
                per_model = counts.setdefault(model, dict.fromkeys(VERDICTS, 0))
                name = "none" if verdict is None else verdict
                per_model[name] = per_model.get(name, 0) + int(n)
        return counts

    # ---- feedback ----------------------------------------------------------------------------

    def add_feedback(
        self,
        inspection_id: str,
        kind: str,
        *,
        mask: str | None = None,
        defect_type: str | None = None,
        note: str | None = None,
    ) -> Feedback:
        """Record the operator's judgement of an inspection (the latest one counts for export).

        ``mask`` (a stored PNG, white = defect) and ``defect_type`` (a folder-safe name, not
        "good") belong to the defect kinds only; empty strings count as not given.
        """
        if kind not in FEEDBACK_KINDS:
            raise DefectscopeError(
                f"{one_line(repr(kind), 60)}: unknown feedback kind (expected one of {', '.join(FEEDBACK_KINDS)})"
            )
        mask = mask or None
        defect_type = defect_type.strip() if isinstance(defect_type, str) and defect_type.strip() else None
        if kind not in DEFECT_KINDS and (mask is not None or defect_type is not None):
            raise DefectscopeError(f"{kind}: a mask or defect type goes with {' or '.join(DEFECT_KINDS)} feedback only")
        if defect_type is not None and (not _DEFECT_TYPE.fullmatch(defect_type) or defect_type.lower() == "good"):
            raise DefectscopeError(
                f"{one_line(repr(defect_type), 80)}: not a usable defect type (letters, digits, _ . -, "
                "at most 64, not 'good'; it names a folder of the export)"
            )
        if mask is not None:
            if not mask.endswith(".png"):
                raise DefectscopeError(f"{one_line(repr(mask), 100)}: a feedback mask must be a stored PNG")
            self._files.require(mask, "the mask")
        unknown = DefectscopeError(f"{one_line(repr(inspection_id), 60)}: no such inspection")
        if not isinstance(inspection_id, str) or not _INSPECTION_ID.fullmatch(inspection_id):
            raise unknown
        values: dict[str, Any] = {
            "inspection_id": inspection_id,
            "kind": kind,
            "created": datetime.now(UTC),
            "mask": mask,
            "defect_type": defect_type,
            "note": clean_text(note, "note") or None,
            "exported": False,
        }
        try:
            with self._write("record the feedback") as conn:
                exists = conn.execute(
                    sa.select(inspections_table.c.id).where(inspections_table.c.id == inspection_id)
                ).first()
                if exists is None:
                    raise unknown
                new_id = conn.execute(
                    sa.insert(feedback_table).values(**values).returning(feedback_table.c.id)
                ).scalar_one()
        except sa.exc.IntegrityError:  # the inspection was purged in between
            raise unknown from None
        return Feedback(id=int(new_id), **values)

    def _latest_feedback(self) -> Any:
        """A subquery: each inspection's latest feedback id."""
        return (
            sa.select(feedback_table.c.inspection_id, sa.func.max(feedback_table.c.id).label("latest"))
            .group_by(feedback_table.c.inspection_id)
            .subquery()
        )

    def feedback_counts(self) -> dict[str, dict[str, int]]:
        """model -> {kind: inspections whose latest feedback is that kind and not yet exported}.

        Models with such feedback only; every kind is listed for them (0 where none).
        """
        latest = self._latest_feedback()
        f, i = feedback_table, inspections_table
        query = (
            sa.select(i.c.model, f.c.kind, sa.func.count())
            .select_from(f.join(latest, f.c.id == latest.c.latest).join(i, i.c.id == f.c.inspection_id))
            .where(f.c.exported == sa.false())
            .group_by(i.c.model, f.c.kind)
        )
        counts: dict[str, dict[str, int]] = {}
        with self._read("count feedback") as conn:
            for model, kind, n in conn.execute(query):
                counts.setdefault(model, dict.fromkeys(FEEDBACK_KINDS, 0))[kind] = int(n)
        return counts

    def feedback_to_export(self, *, model: str | None = None, everything: bool = False) -> builtins.list[Inspection]:
        """Inspections whose latest feedback is not exported yet (``everything``: all with feedback),
        by model, then oldest first."""
        latest = self._latest_feedback()
        f, i = feedback_table, inspections_table
        query = sa.select(i).join(latest, latest.c.inspection_id == i.c.id).join(f, f.c.id == latest.c.latest)
        if not everything:
            query = query.where(f.c.exported == sa.false())
        if model is not None:
            query = query.where(i.c.model == model)
        with self._read("read feedback") as conn:
            rows = conn.execute(query.order_by(i.c.model, i.c.created, i.c.id)).all()
            return self._inspections(conn, rows)

    def mark_exported(self, feedback_ids: Iterable[int]) -> None:
        """Mark feedback as written to an export (it no longer counts as waiting)."""
        ids = sorted({int(i) for i in feedback_ids})
        with self._write("mark feedback as exported") as conn:
            for chunk in _chunks(ids):
                conn.execute(sa.update(feedback_table).where(feedback_table.c.id.in_(chunk)).values(exported=True))

    # ---- retention ---------------------------------------------------------------------------

    def purge(self, older_than: datetime) -> int:
        """Delete inspections created before ``older_than`` with their feedback, then the files no
        remaining row names; returns how many inspections were deleted.

        A file stored (or stored again) after ``older_than`` is kept: it may belong to an
        inspection being logged right now.
        """
        cutoff = utc(older_than)
        i, f = inspections_table, feedback_table
        names: set[str] = set()
        removed = 0
        while not self._closing:
            with self._write("purge old inspections") as conn:
                rows = conn.execute(
                    sa.select(i.c.id, i.c.image, i.c.map)
                    .where(i.c.created < cutoff)
                    .order_by(i.c.created)
                    .limit(_CHUNK)
                ).all()
                if not rows:
                    break
                ids = [r.id for r in rows]
                names |= {r.image for r in rows} | {r.map for r in rows if r.map}
                masks = conn.execute(sa.select(f.c.mask).where(f.c.inspection_id.in_(ids), f.c.mask.is_not(None)))
                names |= {m for (m,) in masks}
                conn.execute(sa.delete(f).where(f.c.inspection_id.in_(ids)))
                conn.execute(sa.delete(i).where(i.c.id.in_(ids)))
            removed += len(rows)
        for name in sorted(names):
            self._files.remove_if_unused(name, cutoff, self._referenced)
        return removed

    def _referenced(self, name: str) -> bool:
        i, f = inspections_table, feedback_table
        with self._read("check stored files") as conn:
            return (
                conn.execute(sa.select(i.c.id).where(sa.or_(i.c.image == name, i.c.map == name)).limit(1)).first()
                is not None
                or conn.execute(sa.select(f.c.id).where(f.c.mask == name).limit(1)).first() is not None
            )

    def purge_expired(self) -> int:
        """Apply the retention given at construction (0 and nothing done without one)."""
        if self.retention is None:
            return 0
        return self.purge(datetime.now(UTC) - self.retention)

    def _maybe_purge(self) -> None:
        """Start the retention purge in the background when it is due (never in a request's way)."""
        if self.retention is None or self._closing:
            return
        with self._purge_lock:
            now = time.monotonic()
            if now - self._last_purge < PURGE_INTERVAL_S or (self._purger is not None and self._purger.is_alive()):
                return
            self._last_purge = now
            self._purger = threading.Thread(target=self._background_purge, name="defectscope-purge", daemon=True)
            self._purger.start()

    def _background_purge(self) -> None:
        try:
            self.purge_expired()
            self.last_purge_error = None
        except Exception as exc:  # nothing below a front end prints: the service can report it
            self.last_purge_error = one_line(str(exc)) or type(exc).__name__

    def wait_for_purge(self, timeout: float | None = None) -> None:
        """Wait until a background purge in progress has finished."""
        purger = self._purger
        if purger is not None:
            purger.join(timeout)

    def close(self) -> None:
        """Stop the background purge (between batches) and close every database connection."""
        self._closing = True
        self.wait_for_purge()
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
