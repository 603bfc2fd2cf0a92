"""Shared fixtures and helpers of the service tests (load with ``pytest_plugins = ["serve_helpers"]``).

- ``serve_run`` (session): a small fitted run, PatchCore on examples/bottle_small at 64 px.
- ``serve_registry`` (session): that run loaded as the model ``bottle``.
- :func:`make_app` / ``serve_app``: the app over a real SQLite :class:`InspectionLog` in a temporary folder.
- :func:`live_server` / ``live_serve``: the app under a real uvicorn server in a background thread on a
  free loopback port, with its base URL and token.
- :func:`serve_process`: ``defectscope serve`` itself in a child process (to stop it, or SIGKILL it), with
  its token.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from defectscope.runs import fit_run
from defectscope.serve.process import ServeChild, start_serve

if TYPE_CHECKING:  # the serve extra is imported where it is used: this module loads without it
    import uvicorn
    from fastapi import FastAPI

    from defectscope.serve.registry import ModelRegistry
    from defectscope.serve.settings import ServeSettings
    from defectscope.serve.store import InspectionLog

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bottle_small"
#: The small fast model of the service tests (a few seconds to fit on 2 cores).
SERVE_PARAMS = {"backbone": "mobilenet_v2", "image_size": 64, "num_neighbors": 3}
TOKEN = "test-token-0123456789abcdef"
MODEL = "bottle"


@dataclass
class ServeApp:
    """An app with the pieces a test needs to talk to it and look behind it."""

    app: FastAPI
    log: InspectionLog
    settings: ServeSettings
    registry: ModelRegistry
    token: str | None
    data_dir: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass
class LiveServer:
    """A running uvicorn server: its base URL (no trailing slash) and token."""

    url: str
    token: str | None
    served: ServeApp
    server: uvicorn.Server = field(repr=False)  # should_exit = True stops it

    @property
    def headers(self) -> dict[str, str]:
        return self.served.headers


def fit_serve_run(out: Path) -> Path:
    """Fit the tests' small PatchCore run into ``out``."""
    fit_run(EXAMPLE, out, params=dict(SERVE_PARAMS))
    return out


def make_app(
    registry: ModelRegistry,
    folder: Path,
    *,
    db_url: str | None = None,
    token: str | None = TOKEN,
    **settings: Any,
) -> ServeApp:
    """The app over ``registry`` with an InspectionLog (SQLite in ``folder/data`` unless ``db_url``);
    ``token`` None serves without auth. Close ``.log`` when done (the ``serve_app`` fixture does)."""
    from defectscope.serve.app import create_app
    from defectscope.serve.settings import ServeSettings
    from defectscope.serve.store import InspectionLog

    data_dir = folder / "data"
    token_file = None
    if token is not None:
        folder.mkdir(parents=True, exist_ok=True)
        token_file = folder / "token"
        token_file.write_text(token + "\n", encoding="utf-8")
    config = replace(
        ServeSettings(data_dir=data_dir, db_url=db_url, token_file=token_file, no_auth=token is None), **settings
    )
    log = InspectionLog(db_url, data_dir, retention_days=config.retention_days)
    try:
        app = create_app(config, registry, log)
    except BaseException:
        log.close()
        raise
    return ServeApp(app, log, config, registry, token, data_dir)


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on a free loopback port (bound before the server starts: no race for the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(2048)
    return sock


@contextmanager
def live_server(served: ServeApp, timeout: float = 30.0) -> Iterator[LiveServer]:
    """Run ``served.app`` under uvicorn in a background thread until the block ends."""
    import uvicorn

    sock = free_socket()
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(served.app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://{host}:{port}", served.token, served, server)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@dataclass
class ServeProcess(ServeChild):
    """``defectscope serve`` in a child process (URL, process, stderr so far) and its token (None with --no-auth)."""

    token: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@contextmanager
def serve_process(
    specs: Sequence[str | Path],
    data_dir: Path,
    *args: str,
    db_url: str | None = None,
    token_file: Path | None = None,
    timeout: float = 120.0,
) -> Iterator[ServeProcess]:
    """Start ``defectscope serve SPECS --port 0 --data-dir DATA_DIR [--db DB_URL] [--token-file TOKEN_FILE] ARGS``
    and wait until it answers (:func:`defectscope.serve.process.start_serve`).

    The token is read from ``token_file`` when given, else from the one the command makes in the
    data folder (none with ``--no-auth``). ``.process.kill()`` is SIGKILL (durability tests); the
    block's end stops it cleanly.
    """
    argv = [*map(str, specs), "--port", "0", "--data-dir", str(data_dir)]
    argv += ["--db", db_url] if db_url is not None else []
    argv += ["--token-file", str(token_file)] if token_file is not None else []
    child = start_serve([*argv, *args], timeout=timeout)
    try:
        token = None
        if "--no-auth" not in args:
            token = (token_file or data_dir / "token").read_text(encoding="utf-8").splitlines()[0].strip()
        yield ServeProcess(child.url, child.process, child.stderr, child.drain, token)
    finally:
        child.stop()


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small fitted run (PatchCore, mobilenet_v2, 64 px) on examples/bottle_small, folder named ``bottle``."""
    return fit_serve_run(tmp_path_factory.mktemp("serve-run") / MODEL)


@pytest.fixture(scope="session")
def serve_registry(serve_run: Path) -> ModelRegistry:
    """``serve_run`` loaded once for the whole session, as the model ``bottle``."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install defectscope[serve])")
    from defectscope.serve.registry import ModelRegistry

    return ModelRegistry.from_specs([str(serve_run)])


@pytest.fixture
def serve_app(serve_registry: ModelRegistry, tmp_path: Path) -> Iterator[ServeApp]:
    """A fresh app (own SQLite log and data folder in ``tmp_path``) over the session's model."""
    served = make_app(serve_registry, tmp_path)
    try:
        yield served
    finally:
        served.log.close()


@pytest.fixture
def live_serve(serve_app: ServeApp) -> Iterator[LiveServer]:
    """``serve_app`` under a real uvicorn server on a free loopback port."""
    with live_server(serve_app) as live:
        yield live
