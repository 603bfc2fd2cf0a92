"""The inspection log's schema and its versioned migrations.

Decision: a small migration mechanism of our own rather than Alembic. The schema is two tables,
the service itself must create and upgrade it on start (no separate ``alembic upgrade`` step for
the operator), and Alembic would be a new dependency with its own configuration files and
environment script to ship inside the package. What we need from it is small and lives here:

- :data:`MIGRATIONS`, an ordered tuple of :class:`Migration` (version, description, a function
  applying it to a connection). A database records every applied version in ``schema_version``.
- :func:`migrate` applies the missing ones in order, each in its own transaction together with
  its ``schema_version`` row, so a failed migration leaves the previous version intact (both
  SQLite and PostgreSQL have transactional DDL).
- Two processes starting together: each step runs under a database-wide lock: ``BEGIN
  IMMEDIATE`` on SQLite (the caller's engine issues it, see :mod:`defectscope.serve.database`), a
  transaction-scoped advisory lock on PostgreSQL. The version is read again under the lock, so
  the second process finds the work done and applies nothing.
- A database whose version is newer than the code knows is refused with one line (an older
  defectscope must not write rows a newer schema does not expect).

Rules for adding a migration: append it (never edit or reorder a released one), write its DDL
against its own frozen table definitions (not the current ones below), and keep
:data:`inspections` / :data:`feedback` (the current schema the queries use) in step with the
result; ``tests/test_serve_store.py`` checks that the migrated schema matches them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine

from ..errors import DefectscopeError

#: Key of the PostgreSQL advisory lock held while migrating ("dsco" + "schm" in ASCII).
ADVISORY_LOCK_KEY = 0x6473636F_7363686D


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime in every back end (SQLite stores it as naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _version_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "schema_version",
        metadata,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("applied", UTCDateTime, nullable=False),
    )


# The current schema, used by the queries in store.py (keep in step with the migrations).
metadata = sa.MetaData()
schema_version = _version_table(metadata)
inspections = sa.Table(
    "inspections",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("created", UTCDateTime, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("model_sha256", sa.Text, nullable=False),
    sa.Column("filename", sa.Text),
    sa.Column("image", sa.Text, nullable=False),
    sa.Column("map", sa.Text),
    sa.Column("score", sa.Double),
    sa.Column("normalized_score", sa.Double),
    sa.Column("verdict", sa.Text),
    sa.Column("threshold", sa.Double),
    sa.Column("rule", sa.Text),
    sa.Column("max_pixel_score", sa.Double),
    sa.Column("reason", sa.Text),
    sa.Column("timings", sa.Text, nullable=False),
    sa.Index("ix_inspections_created", "created"),
    sa.Index("ix_inspections_model_created", "model", "created"),
    sa.Index("ix_inspections_verdict_created", "verdict", "created"),
    sa.Index("ix_inspections_image", "image"),
    sa.Index("ix_inspections_map", "map"),
)
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("inspection_id", sa.String(32), sa.ForeignKey("inspections.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("created", UTCDateTime, nullable=False),
    sa.Column("mask", sa.Text),
    sa.Column("defect_type", sa.Text),
    sa.Column("note", sa.Text),
    sa.Column("exported", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_feedback_inspection", "inspection_id"),
    sa.Index("ix_feedback_mask", "mask"),
    sa.Index("ix_feedback_exported", "exported", "inspection_id"),
)


@dataclass(frozen=True)
class Migration:
    """One schema step: applied once, in one transaction, to reach ``version``."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_tables(conn: Connection) -> None:
    """The inspections and their operator feedback (frozen as released in version 1)."""
    frozen = sa.MetaData()
    sa.Table(
        "inspections",
        frozen,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created", UTCDateTime, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("model_sha256", sa.Text, nullable=False),
        sa.Column("filename", sa.Text),
        sa.Column("image", sa.Text, nullable=False),
        sa.Column("map", sa.Text),
        sa.Column("score", sa.Double),
        sa.Column("normalized_score", sa.Double),
        sa.Column("verdict", sa.Text),
        sa.Column("threshold", sa.Double),
        sa.Column("rule", sa.Text),
        sa.Column("max_pixel_score", sa.Double),
        sa.Column("reason", sa.Text),
        sa.Column("timings", sa.Text, nullable=False),
        sa.Index("ix_inspections_created", "created"),
    )
    sa.Table(
        "feedback",
        frozen,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.String(32), sa.ForeignKey("inspections.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("created", UTCDateTime, nullable=False),
        sa.Column("mask", sa.Text),
        sa.Column("defect_type", sa.Text),
        sa.Column("note", sa.Text),
        sa.Column("exported", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Index("ix_feedback_inspection", "inspection_id"),
    )
    frozen.create_all(conn)


_V2_INDEXES = (
    "CREATE INDEX ix_inspections_model_created ON inspections (model, created)",
    "CREATE INDEX ix_inspections_verdict_created ON inspections (verdict, created)",
    "CREATE INDEX ix_inspections_image ON inspections (image)",
    "CREATE INDEX ix_inspections_map ON inspections (map)",
    "CREATE INDEX ix_feedback_mask ON feedback (mask)",
    "CREATE INDEX ix_feedback_exported ON feedback (exported, inspection_id)",
)


def _v2_indexes(conn: Connection) -> None:
    """Indexes for the history filters (model / verdict over time), retention's file checks and export."""
    for statement in _V2_INDEXES:
        conn.exec_driver_sql(statement)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "inspections and feedback tables", _v1_tables),
    Migration(2, "indexes for history filters, retention and export", _v2_indexes),
)
LATEST = MIGRATIONS[-1].version
assert [m.version for m in MIGRATIONS] == list(range(1, LATEST + 1)), "migrations must be numbered 1, 2, 3 ..."


def _lock(conn: Connection) -> None:
    """Serialise migrating processes (SQLite: the caller's BEGIN IMMEDIATE already holds the write lock)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})


def current_version(conn: Connection) -> int:
    """The highest applied version; 0 for a database without the schema_version table."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)


def _check_known(version: int, latest: int, where: str) -> None:
    if version > latest:
        raise DefectscopeError(
            f"{where}: the inspection log's schema is version {version}, newer than this defectscope "
            f"knows (up to {latest}); use the defectscope version that wrote it, or a newer one"
        )


def migrate(engine: Engine, where: str, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database of ``engine`` to the last of ``migrations``; returns the version it is at.

    ``engine`` must open write transactions (``BEGIN IMMEDIATE`` on SQLite). ``where`` names the
    database in the error for a schema newer than the code. Safe to run from several processes at
    once: each step takes the lock, re-reads the version and applies at most one migration.
    """
    latest = migrations[-1].version if migrations else 0
    with engine.connect() as conn:  # the usual case, up to date: no lock taken
        version = current_version(conn)
        conn.rollback()
    _check_known(version, latest, where)
    while version < latest:
        with engine.begin() as conn:
            _lock(conn)
            _version_table(sa.MetaData()).create(conn, checkfirst=True)
            version = current_version(conn)
            _check_known(version, latest, where)
            if version >= latest:
                break
            step = next(m for m in migrations if m.version == version + 1)
            step.apply(conn)
            conn.execute(
                sa.insert(schema_version).values(
                    version=step.version, description=step.description, applied=datetime.now(UTC)
                )
            )
            version = step.version
    return version


def applied(conn: Connection) -> list[dict[str, Any]]:
    """The schema_version rows, oldest first (for diagnostics and tests)."""
    rows = conn.execute(sa.select(schema_version).order_by(schema_version.c.version)).mappings()
    return [dict(row) for row in rows]
