"""The inspection log: rows, feedback, stored files, retention and schema migrations, against
SQLite and a real PostgreSQL server (the ``backend`` fixture runs each test on both; PostgreSQL
skips with a reason where no server can be started, see ``tests/pg_cluster.py``)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from defectscope.errors import DefectscopeError
from defectscope.serve import migrations
from defectscope.serve.store import (
    DEFAULT_DB_NAME,
    FEEDBACK_KINDS,
    Inspection,
    InspectionIn,
    InspectionLog,
    database_url,
    default_db_url,
)
from defectscope.serve.store import _make_engine as store_engine  # BEGIN IMMEDIATE on SQLite

REPO = Path(__file__).resolve().parents[1]
PNG = (REPO / "examples" / "bottle_small" / "test" / "good" / "000.png").read_bytes()


@pytest.fixture
def log(backend: str, tmp_path: Path) -> Iterator[InspectionLog]:
    with InspectionLog(backend, tmp_path / "data") as opened:
        yield opened


def row_for(log: InspectionLog, **changes: object) -> InspectionIn:
    """An inspection of the bundled example's first good image, as the service would log it."""
    values: dict[str, object] = {
        "model": "bottle",
        "model_sha256": "ab" * 32,
        "filename": "000.png",
        "image": log.store_file(PNG, ".png"),
        "map": log.store_file(b"\x93NUMPY fake map", ".npy"),
        "score": 1.25,
        "normalized_score": 0.8,
        "verdict": "good",
        "threshold": 1.5,
        "rule": "conformal",
        "max_pixel_score": 2.5,
        "reason": None,
        "timings": {"decode_ms": 3.0, "model_ms": 40.5},
    }
    values.update(changes)
    return InspectionIn(**values)  # type: ignore[arg-type]


def one_line_error(info: pytest.ExceptionInfo[DefectscopeError], *fragments: str) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- rows ------------------------------------------------------------------------------------


def test_inspection_round_trip(log: InspectionLog) -> None:
    before = datetime.now(UTC)
    added = log.add_inspection(row_for(log))
    assert isinstance(added, Inspection) and len(added.id) == 32 and added.feedback == ()
    assert added.created.tzinfo is not None and added.created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= added.created <= datetime.now(UTC) + timedelta(seconds=1)
    got = log.get(added.id)
    assert got == added
    assert got.created.tzinfo is not None and got.created.utcoffset() == timedelta(0)
    as_json = json.loads(json.dumps(got.to_dict(), allow_nan=False))
    assert as_json["id"] == added.id and as_json["verdict"] == "good" and as_json["feedback"] == []
    assert as_json["timings"] == {"decode_ms": 3.0, "model_ms": 40.5}
    assert datetime.fromisoformat(as_json["created"]) == added.created
    assert set(as_json) == {
        "id",
        "created",
        "model",
        "model_sha256",
        "filename",
        "score",
        "normalized_score",
        "verdict",
        "threshold",
        "rule",
        "max_pixel_score",
        "reason",
        "timings",
        "feedback",
    }
    with pytest.raises(AttributeError):
        got.score = 2.0  # type: ignore[misc]


def test_get_unknown_or_malformed_id_is_none(log: InspectionLog) -> None:
    log.add_inspection(row_for(log))
    for bad in ("0" * 32, "", "../../etc/passwd", "x" * 10_000, "' OR 1=1 --", "A" * 32):
        assert log.get(bad) is None


def test_non_finite_numbers_are_stored_as_null(log: InspectionLog) -> None:
    added = log.add_inspection(
        row_for(
            log,
            score=float("nan"),
            normalized_score=None,
            verdict="error",
            threshold=float("inf"),
            max_pixel_score=float("-inf"),
            reason="the anomaly score is not a finite number (nan)",
            timings={"decode_ms": 1.0, "model_ms": float("nan")},
        )
    )
    got = log.get(added.id)
    assert got == added
    assert (got.score, got.threshold, got.max_pixel_score) == (None, None, None)
    assert got.verdict == "error" and got.timings == {"decode_ms": 1.0}
    json.dumps(got.to_dict(), allow_nan=False)


def test_numpy_numbers_and_none_verdict(log: InspectionLog) -> None:
    np = pytest.importorskip("numpy")
    added = log.add_inspection(
        row_for(log, score=np.float32(0.5), threshold=None, normalized_score=None, verdict=None)  # type: ignore[arg-type]
    )
    got = log.get(added.id)
    assert got is not None and got.score == 0.5 and isinstance(got.score, float) and got.verdict == "none"


def test_hostile_text_is_stored_as_text(log: InspectionLog) -> None:
    name = "a\x00b\udcff" + "é" * 3000
    added = log.add_inspection(row_for(log, filename=name, reason="\x00" * 10))
    got = log.get(added.id)
    assert got == added and got.filename is not None and "\x00" not in got.filename
    assert got.filename.startswith("a\\x00b\\udcff") and len(got.filename) <= 1024


def test_add_inspection_checks_its_input(log: InspectionLog) -> None:
    with pytest.raises(DefectscopeError) as info:
        log.add_inspection(row_for(log, verdict="maybe"))
    one_line_error(info, "'maybe'", "not a verdict")
    with pytest.raises(DefectscopeError) as info:
        log.add_inspection(row_for(log, image="0" * 64 + ".png"))
    one_line_error(info, "not a stored file")
    with pytest.raises(DefectscopeError) as info:
        log.add_inspection(row_for(log, map="../../x.npy"))
    one_line_error(info, "not a stored file name")
    with pytest.raises(DefectscopeError):
        log.add_inspection(row_for(log, model=""))
    assert log.list() == ([], 0)


def test_list_filters_newest_first_and_pages(log: InspectionLog) -> None:
    added = []
    for n in range(7):
        model = "bottle" if n % 2 == 0 else "cable"
        verdict = "anomalous" if n % 3 == 0 else "good"
        added.append(log.add_inspection(row_for(log, model=model, verdict=verdict, filename=f"{n}.png")))
        time.sleep(0.002)
    items, total = log.list()
    assert total == 7 and [i.id for i in items] == [i.id for i in reversed(added)]
    items, total = log.list(limit=3, offset=2)
    assert total == 7 and [i.filename for i in items] == ["4.png", "3.png", "2.png"]
    items, total = log.list(model="bottle")
    assert total == 4 and {i.model for i in items} == {"bottle"}
    items, total = log.list(model="cable", verdict="anomalous")
    assert total == 1 and items[0].filename == "3.png"
    items, total = log.list(since=added[2].created, until=added[5].created)
    assert total == 3 and [i.filename for i in items] == ["4.png", "3.png", "2.png"]
    naive = added[5].created.replace(tzinfo=None)  # naive times are UTC
    assert log.list(since=naive)[1] == 2
    tokyo = added[5].created.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))
    assert log.list(since=tokyo)[1] == 2
    assert log.list(limit=0) == ([], 7)
    assert log.list(model="nothing") == ([], 0)
    assert log.list(offset=100) == ([], 7)


def test_list_refuses_bad_pages(log: InspectionLog) -> None:
    for kwargs in ({"limit": -1}, {"limit": 100_000}, {"offset": -5}):
        with pytest.raises(DefectscopeError) as info:
            log.list(**kwargs)  # type: ignore[arg-type]
        one_line_error(info)


def test_verdict_counts(log: InspectionLog, backend: str, tmp_path: Path) -> None:
    assert log.verdict_counts() == {}
    for verdict in ("good", "good", "anomalous", "error", None):
        log.add_inspection(row_for(log, verdict=verdict))
    for verdict in ("anomalous", "anomalous"):
        log.add_inspection(row_for(log, model="cable", verdict=verdict))
    zeros = {"good": 0, "anomalous": 0, "error": 0, "none": 0}
    assert log.verdict_counts() == {
        "bottle": {"good": 2, "anomalous": 1, "error": 1, "none": 1},
        "cable": zeros | {"anomalous": 2},
    }
    # the counts agree with the filtered listing the page used to ask for, verdict by verdict
    for model, counts in log.verdict_counts().items():
        for verdict, n in counts.items():
            assert log.list(model=model, verdict=verdict, limit=0)[1] == n
    # a NULL verdict (not written by add_inspection, but the column allows it) counts as none
    engine = _engine(backend, tmp_path / "data")
    with engine.begin() as conn:
        table = migrations.inspections
        conn.execute(sa.update(table).where(table.c.model == "cable").values(verdict=None))
    engine.dispose()
    assert log.verdict_counts()["cable"] == zeros | {"none": 2}
    log.purge(datetime.now(UTC) + timedelta(seconds=1))
    assert log.verdict_counts() == {}


def test_concurrent_writers(log: InspectionLog) -> None:
    row = row_for(log)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(15):
                inspection = log.add_inspection(row)
                log.add_feedback(inspection.id, "confirmed_good")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert log.list(limit=0)[1] == 90
    assert log.feedback_counts()["bottle"]["confirmed_good"] == 90


# ---- feedback --------------------------------------------------------------------------------


def test_feedback_round_trip_and_counts(log: InspectionLog) -> None:
    a = log.add_inspection(row_for(log))
    b = log.add_inspection(row_for(log, verdict="anomalous"))
    c = log.add_inspection(row_for(log, model="cable"))
    mask = log.store_file(PNG, ".png")
    fa = log.add_feedback(a.id, "missed_defect", mask=mask, defect_type="scratch", note="left edge")
    assert (fa.kind, fa.mask, fa.defect_type, fa.note) == ("missed_defect", mask, "scratch", "left edge")
    assert fa.exported is False
    assert fa.created.utcoffset() == timedelta(0)
    log.add_feedback(b.id, "confirmed_defect")
    fb2 = log.add_feedback(b.id, "false_alarm", defect_type="", note="")  # the operator changed their mind
    log.add_feedback(c.id, "confirmed_good")
    got = log.get(b.id)
    assert got is not None and [f.kind for f in got.feedback] == ["confirmed_defect", "false_alarm"]
    assert got.latest_feedback == fb2 and fb2.defect_type is None and fb2.note is None
    assert got.to_dict()["feedback"][1] == fb2.to_dict()
    assert fb2.to_dict()["kind"] == "false_alarm" and fb2.to_dict()["exported"] is False
    counts = log.feedback_counts()
    assert counts == {
        "bottle": {"confirmed_defect": 0, "false_alarm": 1, "missed_defect": 1, "confirmed_good": 0},
        "cable": {"confirmed_defect": 0, "false_alarm": 0, "missed_defect": 0, "confirmed_good": 1},
    }
    pending = log.feedback_to_export()
    assert [i.id for i in pending] == [a.id, b.id, c.id]
    assert [i.id for i in log.feedback_to_export(model="cable")] == [c.id]
    log.mark_exported([f.id for i in pending if i.model == "bottle" for f in i.feedback])
    assert log.feedback_counts() == {"cable": counts["cable"]}
    assert [i.id for i in log.feedback_to_export()] == [c.id]
    assert [i.id for i in log.feedback_to_export(everything=True)] == [a.id, b.id, c.id]
    assert all(f.exported for f in log.get(a.id).feedback)  # type: ignore[union-attr]
    log.add_feedback(a.id, "confirmed_defect")  # new feedback after an export waits again
    assert log.feedback_counts()["bottle"] == dict.fromkeys(FEEDBACK_KINDS, 0) | {"confirmed_defect": 1}


def test_feedback_errors_are_one_line(log: InspectionLog) -> None:
    inspection = log.add_inspection(row_for(log))
    png = log.store_file(PNG, ".png")
    npy = log.store_file(b"map", ".npy")
    cases = [
        ((inspection.id, "great"), {}, "unknown feedback kind"),
        (("0" * 32, "false_alarm"), {}, "no such inspection"),
        (("../x", "false_alarm"), {}, "no such inspection"),
        ((inspection.id, "false_alarm"), {"mask": png}, "goes with confirmed_defect or missed_defect"),
        ((inspection.id, "confirmed_good"), {"defect_type": "scratch"}, "goes with"),
        ((inspection.id, "confirmed_defect"), {"defect_type": "../../etc"}, "not a usable defect type"),
        ((inspection.id, "confirmed_defect"), {"defect_type": "good"}, "not a usable defect type"),
        ((inspection.id, "confirmed_defect"), {"defect_type": "a/b"}, "not a usable defect type"),
        ((inspection.id, "confirmed_defect"), {"mask": npy}, "must be a stored PNG"),
        ((inspection.id, "confirmed_defect"), {"mask": "1" * 64 + ".png"}, "not a stored file"),
        ((inspection.id, "confirmed_defect"), {"mask": "/etc/passwd.png"}, "not a stored file name"),
    ]
    for args, kwargs, fragment in cases:
        with pytest.raises(DefectscopeError) as info:
            log.add_feedback(*args, **kwargs)  # type: ignore[arg-type]
        one_line_error(info, fragment)
    assert log.get(inspection.id).feedback == ()  # type: ignore[union-attr]
    assert log.feedback_counts() == {}


# ---- files -----------------------------------------------------------------------------------


def test_files_by_content_hash(log: InspectionLog, tmp_path: Path) -> None:
    name = log.store_file(PNG, ".PNG")
    digest = hashlib.sha256(PNG).hexdigest()
    assert name == f"{digest}.png"
    path = log.file_path(name)
    assert path == tmp_path / "data" / "files" / digest[:2] / name and path.read_bytes() == PNG
    assert log.store_file(PNG, ".png") == name
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temporary file left
    assert log.store_file(b"", ".npy") == hashlib.sha256(b"").hexdigest() + ".npy"
    for suffix in ("", ".exe", "/../x", ".png/../../a", ".PNG\x00"):
        with pytest.raises(DefectscopeError) as info:
            log.store_file(b"x", suffix)
        one_line_error(info, "cannot store files of this kind")


def test_file_path_refuses_other_names(log: InspectionLog) -> None:
    good = "a" * 64 + ".jpg"
    assert log.file_path(good).name == good
    bad = [
        "",
        "../" + good,
        good + "/..",
        "/" + good,
        "A" * 64 + ".png",
        "a" * 63 + ".png",
        "a" * 65 + ".png",
        "a" * 64 + ".exe",
        "a" * 64,
        "a" * 64 + ".png\n",
        "..",
        "a" * 64 + ".png\x00",
    ]
    for name in bad:
        with pytest.raises(DefectscopeError) as info:
            log.file_path(name)
        one_line_error(info, "not a stored file name")


# ---- retention -------------------------------------------------------------------------------


def test_purge_deletes_old_rows_their_feedback_and_unused_files(log: InspectionLog) -> None:
    shared_image = log.store_file(PNG, ".png")
    old_map = log.store_file(b"old map", ".npy")
    old_mask = log.store_file(PNG + b"mask", ".png")
    old = log.add_inspection(row_for(log, image=shared_image, map=old_map))
    log.add_feedback(old.id, "confirmed_defect", mask=old_mask)
    old_only = log.add_inspection(row_for(log, image=log.store_file(b"old only", ".png"), map=None))
    time.sleep(0.05)
    cutoff = datetime.now(UTC)
    time.sleep(0.05)
    new = log.add_inspection(row_for(log, image=log.store_file(PNG, ".png"), map=log.store_file(b"new map", ".npy")))
    assert log.purge(cutoff) == 2
    assert log.get(old.id) is None and log.get(old_only.id) is None and log.get(new.id) == new
    assert log.feedback_counts() == {}
    assert log.file_path(shared_image).is_file()  # still named by the new inspection
    assert log.file_path(new.map).is_file()  # type: ignore[arg-type]
    for gone in (old_map, old_mask, old_only.image):
        assert not log.file_path(gone).exists(), gone
    leftovers = [p.name for p in log.file_path(shared_image).parents[1].rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    assert log.purge(cutoff) == 0
    assert log.purge(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert not log.file_path(shared_image).exists() and log.list() == ([], 0)


def test_purge_keeps_a_file_stored_again_after_the_cutoff(log: InspectionLog) -> None:
    """An inspection being logged right now may name the same image as an old one."""
    old = log.add_inspection(row_for(log, map=None))
    time.sleep(0.05)
    cutoff = datetime.now(UTC)
    time.sleep(0.05)
    assert log.store_file(PNG, ".png") == old.image  # the service stores it again; its row is not written yet
    assert log.purge(cutoff) == 1
    assert log.file_path(old.image).is_file()


def _age(url: str, data_dir: Path, inspection_id: str, days: float) -> None:
    engine = sa.create_engine(database_url(url, data_dir))
    with engine.begin() as conn:
        table = migrations.inspections
        conn.execute(
            sa.update(table).where(table.c.id == inspection_id).values(created=datetime.now(UTC) - timedelta(days=days))
        )
    engine.dispose()


def test_retention_purges_in_the_background(backend: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with InspectionLog(backend, data) as log:
        old = log.add_inspection(row_for(log))
        new = log.add_inspection(row_for(log, map=None))
    _age(backend, data, old.id, days=3)
    stamp = time.time() - 3 * 86400
    os.utime(InspectionLog(backend, data).file_path(old.map or ""), (stamp, stamp))  # the files are as old
    with InspectionLog(backend, data, retention_days=2) as log:
        log.wait_for_purge(timeout=30)
        assert log.last_purge_error is None
        assert log.get(old.id) is None and log.get(new.id) is not None
        assert log.file_path(new.image).is_file() and not log.file_path(old.map).exists()  # type: ignore[arg-type]
        assert log.purge_expired() == 0
    with pytest.raises(DefectscopeError) as info:
        InspectionLog(backend, data, retention_days=0)
    one_line_error(info, "retention")


# ---- schema and migrations ---------------------------------------------------------------------


def _engine(url: str, data_dir: Path) -> sa.Engine:
    return sa.create_engine(database_url(url, data_dir))


def test_schema_matches_the_current_tables(log: InspectionLog, backend: str, tmp_path: Path) -> None:
    engine = _engine(backend, tmp_path / "data")
    inspector = sa.inspect(engine)
    for table in (migrations.inspections, migrations.feedback, migrations.schema_version):
        assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.c.keys()), table.name
        indexes = {ix["name"] for ix in inspector.get_indexes(table.name)}
        assert indexes == {ix.name for ix in table.indexes}, table.name
    with engine.connect() as conn:
        rows = migrations.applied(conn)
    assert [r["version"] for r in rows] == list(range(1, migrations.LATEST + 1)) and log.version == migrations.LATEST
    assert all(r["applied"].utcoffset() == timedelta(0) for r in rows)
    engine.dispose()


def test_a_version_1_database_migrates_and_keeps_its_rows(backend: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    url = database_url(backend, data)
    if url.get_backend_name() == "sqlite":
        Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url)
    assert migrations.migrate(engine, "test", migrations.MIGRATIONS[:1]) == 1
    assert "ix_inspections_model_created" not in {ix["name"] for ix in sa.inspect(engine).get_indexes("inspections")}
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    with engine.begin() as conn:  # rows as version 1 wrote them
        conn.execute(
            sa.text(
                "INSERT INTO inspections (id, created, model, model_sha256, filename, image, map, score, "
                "normalized_score, verdict, threshold, rule, max_pixel_score, reason, timings) VALUES "
                "(:id, :created, 'bottle', 'ff', 'a.png', :image, NULL, 2.5, 1.25, 'anomalous', 2.0, "
                "'conformal', 3.0, NULL, '{\"model_ms\": 7.0}')"
            ).bindparams(sa.bindparam("created", type_=migrations.UTCDateTime)),
            {"id": "1" * 32, "created": created, "image": "2" * 64 + ".png"},
        )
        conn.execute(
            sa.insert(migrations.feedback).values(
                inspection_id="1" * 32, kind="confirmed_defect", created=created, exported=False
            )
        )
    engine.dispose()
    with InspectionLog(backend, data) as log:
        assert log.version == migrations.LATEST
        got = log.get("1" * 32)
        assert got is not None and got.created == created and got.score == 2.5 and got.timings == {"model_ms": 7.0}
        assert [f.kind for f in got.feedback] == ["confirmed_defect"]
        assert log.feedback_counts() == {"bottle": dict.fromkeys(FEEDBACK_KINDS, 0) | {"confirmed_defect": 1}}
    engine = sa.create_engine(url)
    indexes = {ix["name"] for ix in sa.inspect(engine).get_indexes("inspections")}
    assert "ix_inspections_model_created" in indexes
    engine.dispose()


def test_a_newer_schema_is_refused(backend: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    InspectionLog(backend, data).close()
    engine = _engine(backend, data)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(migrations.schema_version).values(version=99, description="future", applied=datetime.now(UTC))
        )
    engine.dispose()
    with pytest.raises(DefectscopeError) as info:
        InspectionLog(backend, data)
    one_line_error(info, "version 99", f"up to {migrations.LATEST}")


def test_concurrent_migrations_apply_each_step_once(backend: str, tmp_path: Path) -> None:
    """Four engines migrate one empty database at once through slow steps: each runs once."""
    calls: list[int] = []

    def slow(version: int) -> migrations.Migration:
        def apply(conn: sa.Connection) -> None:
            calls.append(version)
            time.sleep(0.2)
            conn.exec_driver_sql(f"CREATE TABLE step_{version} (x INTEGER)")

        return migrations.Migration(version, f"step {version}", apply)

    steps = [slow(1), slow(2), slow(3)]
    data = tmp_path / "data"
    data.mkdir()
    url = database_url(backend, data)
    if url.get_backend_name() == "sqlite":
        Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
    engines = [store_engine(url).execution_options(defectscope_write=True) for _ in range(4)]
    results: list[int] = []
    errors: list[BaseException] = []

    def work(engine: sa.Engine) -> None:
        try:
            results.append(migrations.migrate(engine, "test", steps))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results == [3, 3, 3, 3] and sorted(calls) == [1, 2, 3]
    with engines[0].connect() as conn:
        assert [r["version"] for r in migrations.applied(conn)] == [1, 2, 3]
    for engine in engines:
        engine.dispose()


def _open_and_log(url: str, data_dir: str, go: Any) -> None:
    """In a forked process: wait for the go, open the log (creating the schema), log five inspections."""
    go.wait(60)
    log = InspectionLog(url, Path(data_dir))
    image = log.store_file(b"same image", ".png")
    for _ in range(5):
        log.add_inspection(InspectionIn("m", "s", None, image, None, 1.0, 0.5, "good", 2.0, "conformal", 1.0, None, {}))
    log.close()


def test_processes_opening_a_new_database_together(backend: str, tmp_path: Path) -> None:
    """Four services start on one new database at the same moment: one creates the schema, all log."""
    context = multiprocessing.get_context("fork")  # already imported: the processes start at once
    go = context.Event()
    procs = [context.Process(target=_open_and_log, args=(backend, str(tmp_path / "data"), go)) for _ in range(4)]
    for proc in procs:
        proc.start()
    go.set()
    for proc in procs:
        proc.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with InspectionLog(backend, tmp_path / "data") as log:
        assert log.list(limit=0)[1] == 20
        engine = _engine(backend, tmp_path / "data")
        with engine.connect() as conn:
            assert [r["version"] for r in migrations.applied(conn)] == list(range(1, migrations.LATEST + 1))
        engine.dispose()


# ---- opening -----------------------------------------------------------------------------------


def test_sqlite_defaults(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with InspectionLog(None, data) as log:
        assert Path(log.url.database or "") == data.resolve() / DEFAULT_DB_NAME
        assert default_db_url(data) == f"sqlite:///{data.resolve() / DEFAULT_DB_NAME}"
        with log._engine.connect() as conn:  # the pragmas every connection gets
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    with InspectionLog(str(tmp_path / "plain.db"), data) as log:  # a file path is a SQLite file
        assert log.where == str(tmp_path / "plain.db")
    with InspectionLog(default_db_url(data), data) as log:
        assert log.list() == ([], 0)


def test_sqlite_writers_wait_for_each_other(tmp_path: Path) -> None:
    """A second process holding the write lock for a moment delays a writer, it does not fail it."""
    data = tmp_path / "data"
    with InspectionLog(None, data) as log:
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
                "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(1.5); c.execute('COMMIT')",
                log.url.database or "",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        log.add_inspection(row_for(log))
        assert time.monotonic() - started > 0.5
        holder.wait(timeout=30)
        assert log.list(limit=0)[1] == 1


def test_bad_urls_are_one_line_errors(tmp_path: Path) -> None:
    cases = [
        ("mysql://user:hunter2@db/log", "unsupported database"),
        ("postgresql+psycopg2://user:hunter2@db/log", "psycopg 3"),
        ("sqlite://", "needs a database file"),
        ("sqlite:///:memory:", "needs a database file"),
        ("http://user:hunter2@host:notaport/x", ""),
    ]
    for url, fragment in cases:
        with pytest.raises(DefectscopeError) as info:
            InspectionLog(url, tmp_path / "data")
        message = one_line_error(info, fragment)
        assert "hunter2" not in message, message


def test_unusable_sqlite_files(tmp_path: Path) -> None:
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_bytes(b"this is not a database file" * 100)
    with pytest.raises(DefectscopeError) as info:
        InspectionLog(f"sqlite:///{not_a_db}", tmp_path / "data")
    one_line_error(info, str(not_a_db), "cannot open the inspection log")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DefectscopeError) as info:
        InspectionLog(f"sqlite:///{blocker}/sub/log.db", tmp_path / "data")
    one_line_error(info, str(blocker))
    with pytest.raises(DefectscopeError) as info:
        InspectionLog(None, blocker / "data")
    one_line_error(info, str(blocker))


def test_create_false_never_makes_a_new_log(tmp_path: Path) -> None:
    with pytest.raises(DefectscopeError) as info:
        InspectionLog(None, tmp_path / "missing", create=False)
    one_line_error(info, "no such data folder")
    (tmp_path / "data").mkdir()
    with pytest.raises(DefectscopeError) as info:
        InspectionLog(None, tmp_path / "data", create=False)
    one_line_error(info, DEFAULT_DB_NAME, "no such inspection log")
    assert list((tmp_path / "data").iterdir()) == []


def test_dataclasses_are_frozen_values() -> None:
    row = InspectionIn("m", "s", None, "a" * 64 + ".png", None, 1.0, None, "good", None, None, None, None, {})
    assert replace(row, score=2.0).score == 2.0
    with pytest.raises(AttributeError):
        row.model = "x"  # type: ignore[misc]
