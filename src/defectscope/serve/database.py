"""The inspection log's database: which one a URL names, how it is connected, and what its
errors say (never the password).

A SQLite file by default (WAL journal, foreign keys on, a busy timeout, and write transactions
opened with ``BEGIN IMMEDIATE`` so that concurrent writers wait for each other instead of
failing), or PostgreSQL through psycopg 3 (``postgresql://`` URLs). A connection made with the
execution option ``defectscope_write=True`` is a writer.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ..errors import DefectscopeError
from .log_records import one_line

#: The SQLite file made in the data folder when no database URL is given.
DEFAULT_DB_NAME = "inspections.db"
#: How long a SQLite writer waits for another one before giving up.
BUSY_TIMEOUT_S = 30


class LogUnavailableError(DefectscopeError):
    """The database stopped answering (server down, disk full, locked for too long): retry later."""


def redact(text: str) -> str:
    """A URL-like string with any password replaced by ***."""
    return re.sub(r"(://[^:/@?#]*:)[^@/]*@", r"\1***@", text)


def error_reason(exc: BaseException, password: str | None) -> str:
    """What a database error says, on one line, without the password."""
    orig = getattr(exc, "orig", None)
    text = one_line(str(orig if orig is not None else exc).split("\n(Background on this error")[0])
    if password:
        text = text.replace(password, "***")
    return text or type(exc).__name__


def default_db_url(data_dir: str | os.PathLike[str]) -> str:
    """The URL of the SQLite file the log uses in ``data_dir`` when no database is given."""
    return f"sqlite:///{os.path.abspath(Path(data_dir) / DEFAULT_DB_NAME)}"


def database_url(url: str | None, data_dir: str | os.PathLike[str]) -> sa.URL:
    """The SQLAlchemy URL for ``url``: None (a SQLite file in ``data_dir``), a plain file path
    (SQLite), ``sqlite:///FILE``, or ``postgresql://`` / ``postgres://`` (connected with psycopg 3)."""
    if not url:
        return sa.URL.create("sqlite", database=os.path.abspath(Path(data_dir) / DEFAULT_DB_NAME))
    if "://" not in url:
        return sa.URL.create("sqlite", database=os.path.abspath(Path(url).expanduser()))
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise DefectscopeError(
            f"{redact(url)}: not a database URL (expected sqlite:///FILE or postgresql://USER@HOST/DATABASE)"
        ) from None
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file:"):
            raise DefectscopeError(
                f"{redact(url)}: the inspection log needs a database file (sqlite:///path/to/log.db), "
                "an in-memory database would lose it"
            )
        return parsed
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername.startswith(("postgresql+", "postgres+")):
        raise DefectscopeError(
            f"{redact(url)}: defectscope connects to PostgreSQL with psycopg 3; write the URL as postgresql://..."
        )
    raise DefectscopeError(
        f"{redact(url)}: unsupported database (expected sqlite:///FILE or postgresql://USER@HOST/DATABASE)"
    )


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per connection: we issue BEGIN ourselves, wait for other writers, enforce foreign keys, WAL."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA foreign_keys = ON")
        _set_wal(cursor)
        cursor.execute("PRAGMA synchronous = FULL")  # a committed row survives a power cut, not only a crash
    finally:
        cursor.close()


def _set_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the lock: switching the
    journal mode of a new database does not wait through the busy timeout, so connections opened at
    the same moment would otherwise fail at once with "database is locked"."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_begin(conn: Connection) -> None:
    """Writers take the write lock up front (no failed lock upgrade mid-transaction); readers do not."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("defectscope_write") else "BEGIN")


def make_engine(url: sa.URL) -> Engine:
    """An engine for ``url`` (from :func:`database_url`), set up as the module docstring says."""
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 10, "application_name": "defectscope"},
    )
