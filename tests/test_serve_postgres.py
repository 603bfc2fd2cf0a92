"""The inspection log on PostgreSQL specifically: URLs, errors that hide the password, time zones,
dropped connections and the advisory lock that serialises migrations. The tests that need a server
use the session's throwaway cluster (``tests/pg_cluster.py``) and skip with the reason without one;
the back-end-independent tests run on PostgreSQL too, from ``test_serve_store.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

import pg_cluster
from defectscope.errors import DefectscopeError
from defectscope.serve import migrations
from defectscope.serve.store import InspectionIn, InspectionLog, LogUnavailableError, database_url
from defectscope.serve.store import _make_engine as store_engine


@pytest.fixture
def database(postgres: pg_cluster.Cluster) -> Iterator[str]:
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


def _row(log: InspectionLog) -> InspectionIn:
    image = log.store_file(b"image bytes", ".png")
    return InspectionIn("bottle", "ff", "a.png", image, None, 1.0, 0.5, "good", 2.0, "conformal", 1.5, None, {})


def test_postgres_urls_use_psycopg_3(tmp_path: Path) -> None:
    for url in ("postgresql://u:p@h:5433/db", "postgres://u:p@h:5433/db", "postgresql+psycopg://u:p@h:5433/db"):
        parsed = database_url(url, tmp_path)
        assert parsed.drivername == "postgresql+psycopg" and (parsed.host, parsed.port, parsed.database) == (
            "h",
            5433,
            "db",
        )
    with pytest.raises(DefectscopeError) as info:
        database_url("postgresql+asyncpg://u:secret@h/db", tmp_path)
    assert "psycopg 3" in str(info.value) and "secret" not in str(info.value)


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DefectscopeError) as info:
        InspectionLog("postgresql://inspector:s3cr3t-pw@127.0.0.1:1/inspections", tmp_path / "data")
    message = str(info.value)
    assert "\n" not in message and "s3cr3t-pw" not in message, message
    assert "postgresql://inspector:***@127.0.0.1:1/inspections" in message, message
    assert "cannot open the inspection log" in message, message
    assert time.monotonic() - started < 30


def test_a_missing_database_is_one_line(postgres: pg_cluster.Cluster, tmp_path: Path) -> None:
    url = sa.make_url(postgres.admin_url).set(database="no_such_db", password="hidden-pw")
    with pytest.raises(DefectscopeError) as info:
        InspectionLog(url.render_as_string(hide_password=False), tmp_path / "data")
    message = str(info.value)
    assert "\n" not in message and "hidden-pw" not in message and "no_such_db" in message, message


def test_times_are_utc_whatever_the_session_time_zone(database: str, tmp_path: Path) -> None:
    tokyo = sa.make_url(database).update_query_dict({"options": "-c timezone=Asia/Tokyo"})
    with InspectionLog(tokyo.render_as_string(hide_password=False), tmp_path / "data") as log:
        with log._engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW timezone").scalar() == "Asia/Tokyo"
        added = log.add_inspection(_row(log))
        got = log.get(added.id)
        assert got is not None and got.created == added.created and got.created.utcoffset() == timedelta(0)
        assert log.list(since=added.created)[1] == 1
        assert log.list(since=added.created + timedelta(microseconds=1))[1] == 0
        assert log.list(until=added.created)[1] == 0
    with InspectionLog(database, tmp_path / "data") as log:  # read back in the server's own zone
        assert log.get(added.id) == got
    engine = sa.create_engine(database_url(database, tmp_path))
    columns = {c["name"]: c["type"] for c in sa.inspect(engine).get_columns("inspections")}
    assert getattr(columns["created"], "timezone", False) is True  # timestamptz
    engine.dispose()


def test_the_log_reconnects_after_the_server_drops_its_connections(database: str, tmp_path: Path) -> None:
    with InspectionLog(database, tmp_path / "data") as log:
        first = log.add_inspection(_row(log))
        admin = sa.create_engine(database_url(database, tmp_path), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            name = sa.make_url(database).database
            dropped = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": name},
            ).scalar()
        admin.dispose()
        assert dropped >= 1
        assert log.get(first.id) == first  # the pool pings and reconnects
        log.add_inspection(_row(log))
        assert log.list(limit=0)[1] == 2


def test_a_vanished_database_raises_log_unavailable(postgres: pg_cluster.Cluster, tmp_path: Path) -> None:
    url = postgres.new_database()
    log = InspectionLog(url, tmp_path / "data")
    log.add_inspection(_row(log))
    postgres.drop_database(url)
    with pytest.raises(LogUnavailableError) as info:
        log.add_inspection(_row(log))
    assert "\n" not in str(info.value) and "cannot log the inspection" in str(info.value)
    with pytest.raises(LogUnavailableError):
        log.list()
    log.close()


def test_migrations_wait_for_the_advisory_lock(database: str, tmp_path: Path) -> None:
    """A process holding the migration lock keeps another from migrating until it lets go."""
    url = database_url(database, tmp_path)
    holder = sa.create_engine(url)
    done = threading.Event()
    with holder.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": migrations.ADVISORY_LOCK_KEY})

        def open_log() -> None:
            InspectionLog(database, tmp_path / "data").close()
            done.set()

        thread = threading.Thread(target=open_log)
        thread.start()
        assert not done.wait(1.5)  # blocked on the lock
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": migrations.ADVISORY_LOCK_KEY})
        conn.commit()
    thread.join(60)
    assert done.is_set()
    engine = store_engine(url)
    with engine.connect() as conn:
        assert migrations.current_version(conn) == migrations.LATEST
    engine.dispose()
    holder.dispose()


def test_feedback_ids_and_booleans_round_trip(database: str, tmp_path: Path) -> None:
    with InspectionLog(database, tmp_path / "data") as log:
        inspection = log.add_inspection(_row(log))
        ids = [log.add_feedback(inspection.id, kind).id for kind in ("confirmed_defect", "false_alarm")]
        assert ids == sorted(ids) and len(set(ids)) == 2
        log.mark_exported(ids[:1])
        got = log.get(inspection.id)
        assert got is not None and [f.exported for f in got.feedback] == [True, False]
        assert log.feedback_counts() == {
            "bottle": {"confirmed_defect": 0, "false_alarm": 1, "missed_defect": 0, "confirmed_good": 0}
        }
        assert log.purge(datetime.now(UTC) + timedelta(seconds=1)) == 1 and log.feedback_counts() == {}
