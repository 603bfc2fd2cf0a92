"""A throwaway PostgreSQL cluster for the tests: one per test session, on a Unix socket in a temp folder.

``shared_cluster()`` starts it on first use (``initdb -A trust --no-sync`` + ``pg_ctl start`` with
fsync off, no TCP listener) and stops it at the end of the session; every test gets a database of
its own from :meth:`Cluster.new_database`. Where ``$DEFECTSCOPE_TEST_POSTGRES_URL`` is set (a server
the caller runs, e.g. in CI), that server is used instead and nothing is started. Where no server
binary exists or the cluster cannot start, :class:`ClusterUnavailable` says why (tests skip with it).

initdb refuses to run as root: as root the binaries run as the ``postgres`` user (or ``nobody``)
through ``runuser``, on a data folder owned by that user.

Loaded as a pytest plugin by ``conftest.py``, it also gives the fixtures:

- ``postgres`` (session): the session's :class:`Cluster`; skips with the reason where there is none.
- ``backend`` (parametrized ``sqlite`` / ``postgresql``): the URL of a fresh, empty database of each kind.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

URL_ENV = "DEFECTSCOPE_TEST_POSTGRES_URL"
BIN_ENV = "DEFECTSCOPE_PG_BIN"


class ClusterUnavailable(Exception):
    """No PostgreSQL server can be used here; the message says why."""


def _bin_dir() -> Path:
    """The folder holding initdb / pg_ctl: $DEFECTSCOPE_PG_BIN, Debian's newest, or the PATH."""
    if os.environ.get(BIN_ENV):  # given: only there
        candidates = [os.environ[BIN_ENV]]
    else:
        versions = glob.glob("/usr/lib/postgresql/*/bin")
        candidates = sorted(versions, key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
        candidates.reverse()
        found = shutil.which("pg_ctl")
        if found:
            candidates.append(str(Path(found).parent))
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    raise ClusterUnavailable(
        f"no PostgreSQL server binaries (initdb, pg_ctl) found in {', '.join(candidates) or 'the PATH'}; "
        "install Debian's postgresql (or set DEFECTSCOPE_PG_BIN)"
    )


def _run_as() -> str | None:
    """The user to run the server as when we are root (initdb refuses root), else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            if shutil.which("runuser"):
                return name
    raise ClusterUnavailable("running as root without a 'postgres' or 'nobody' user and runuser to start initdb")


class Cluster:
    """A running server: its admin URL, and databases made for single tests."""

    def __init__(self, admin_url: str, stop: list[str] | None = None, folder: Path | None = None) -> None:
        import sqlalchemy as sa  # the serve extra: imported when a cluster is used (conftest loads this module)

        self.admin_url = admin_url
        self._stop = stop
        self._folder = folder
        self._admin = sa.create_engine(  # no pooled connection: safe in forked test processes
            admin_url.replace("postgresql://", "postgresql+psycopg://", 1),
            isolation_level="AUTOCOMMIT",
            poolclass=sa.pool.NullPool,
        )

    def new_database(self) -> str:
        """Create an empty database and return its ``postgresql://`` URL."""
        import sqlalchemy as sa

        name = f"t_{uuid.uuid4().hex[:16]}"
        with self._admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = sa.make_url(self.admin_url).set(database=name)
        return url.render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        import sqlalchemy as sa

        name = sa.make_url(url).database
        with self._admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        self._admin.dispose()
        if self._stop is not None:
            subprocess.run(self._stop, capture_output=True, check=False, timeout=60)
            self._stop = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def start_cluster() -> Cluster:
    """initdb + pg_ctl start a new cluster in a temp folder; raises ClusterUnavailable with the reason."""
    bin_dir = _bin_dir()
    user = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="dspg-"))
    data, sockets, log = folder / "data", folder / "sock", folder / "server.log"
    sockets.mkdir()
    prefix = ["runuser", "-u", user, "--"] if user else []
    if user:
        info = pwd.getpwnam(user)
        for path in (folder, sockets):
            os.chown(path, info.pw_uid, info.pw_gid)
    options = (
        f"-c listen_addresses='' -k {sockets} -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=60 -c shared_buffers=32MB"
    )
    commands = [
        [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "--no-sync", "-U", "postgres", "-E", "UTF8"],
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start"],
    ]
    for command in commands:
        try:
            done = subprocess.run(prefix + command, capture_output=True, text=True, check=False, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ClusterUnavailable(f"{Path(command[0]).name} failed: {exc}") from None
        if done.returncode != 0:
            server_log = log.read_text(errors="replace")[-500:] if log.is_file() else ""
            text = " ".join((done.stderr + done.stdout + server_log).split())[-400:]
            shutil.rmtree(folder, ignore_errors=True)
            raise ClusterUnavailable(f"{Path(command[0]).name} failed (exit {done.returncode}): {text}")
    stop = [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
    return Cluster(f"postgresql://postgres@/postgres?host={sockets}", stop, folder)


_shared: Cluster | ClusterUnavailable | None = None


def shared_cluster() -> Cluster:
    """The session's cluster (started once; a failure is remembered and raised again)."""
    global _shared
    if _shared is None:
        if os.environ.get(URL_ENV):
            _shared = Cluster(os.environ[URL_ENV])
        else:
            try:
                _shared = start_cluster()
            except ClusterUnavailable as exc:
                _shared = exc
            else:
                atexit.register(stop_shared)
    if isinstance(_shared, ClusterUnavailable):
        raise _shared
    return _shared


def stop_shared() -> None:
    """Stop the session's cluster if one was started (idempotent)."""
    if isinstance(_shared, Cluster):
        _shared.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """The session's cluster (see :func:`shared_cluster`); the test skips with the reason without one."""
    try:
        cluster = shared_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(f"no PostgreSQL server for the tests: {exc}")
    yield cluster
    stop_shared()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL of a fresh, empty database of each kind.

    The SQLite one is where ``defectscope serve`` keeps it by default: ``tmp_path/data/inspections.db``,
    inside the data folder ``tmp_path/data`` (``feedback export --db`` finds the files next to it).
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'inspections.db'}"
        return
    cluster: Cluster = request.getfixturevalue("postgres")
    url = cluster.new_database()
    yield url
    cluster.drop_database(url)
