"""``defectscope serve``: the inspection service (HTTP API, operator page, inspection log) on uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import DefectscopeError, OutputError
from ..serve.settings import ServeSettings
from .common import add_device, add_engine, engine_choice, info, parse_number, positive_int

DEFAULT_DATA_DIR = Path("defectscope-data")
#: The token file made in the data folder when neither --token-file nor --no-auth is given.
TOKEN_NAME = "token"


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(entry[4][0]).is_loopback for entry in found)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), or a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        raise DefectscopeError(f"--host {host}: not an address of this machine ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise DefectscopeError(f"{host}:{port}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def default_token(data_dir: Path) -> Path:
    """``data_dir/token``, made with a random token (readable by its owner only) when it does not exist."""
    path = data_dir / TOKEN_NAME
    if path.exists():
        return path
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write a token file ({exc.strerror or exc})") from None
    info(f"made a new access token in {path}")
    return path


def settings_of(args: argparse.Namespace) -> ServeSettings:
    """The settings the arguments ask for, checked (one-line errors) before anything is loaded."""
    if args.no_auth and args.token_file:
        raise DefectscopeError("--no-auth and --token-file exclude each other")
    if args.no_auth and not is_loopback(args.host):
        raise DefectscopeError(
            f"--no-auth is only allowed on a loopback address (127.0.0.1, ::1, localhost), not {args.host}; "
            "give --token-file FILE"
        )
    if args.retention_days is not None and not args.retention_days > 0:
        raise DefectscopeError(f"--retention-days must be a positive number of days, got {args.retention_days}")
    data_dir = Path(args.data_dir).expanduser()
    return ServeSettings(
        host=args.host,
        port=args.port,
        db_url=args.db,
        data_dir=data_dir,
        token_file=Path(args.token_file).expanduser() if args.token_file else None,
        no_auth=args.no_auth,
        max_batch=args.max_batch,
        retention_days=args.retention_days,
        device=args.device,
        engine=engine_choice(args),
    )


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import uvicorn

    from ..serve.app import create_app, read_token
    from ..serve.registry import ModelRegistry
    from ..serve.store import InspectionLog

    settings = settings_of(args)
    if settings.token_file is not None:
        read_token(settings.token_file)  # readable, non-empty: checked before the models load
    registry = ModelRegistry.from_specs(args.runs, device=settings.device, engine=settings.engine, log=info)
    sock = bind(settings.host, settings.port)  # before anything is written: a taken port leaves no trace
    try:
        if not settings.no_auth and settings.token_file is None:
            settings = dataclasses.replace(settings, token_file=default_token(settings.data_dir))
        log = InspectionLog(settings.db_url, settings.data_dir, retention_days=settings.retention_days)
        try:
            app = create_app(settings, registry, log)
            url = url_of(sock)
            auth = "no token needed (--no-auth)" if settings.no_auth else f"token: first line of {settings.token_file}"
            info(f"serving {', '.join(registry.names)} at {url}/ (API docs {url}/docs; {auth}); Ctrl-C stops")
            config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
            with _stopped_by_signals():
                uvicorn.Server(config).run(sockets=[sock])
        finally:
            log.close()
    finally:
        sock.close()
    info("stopped")
    return 0


class _Stop(Exception):
    """SIGINT or SIGTERM after uvicorn's graceful shutdown (uvicorn raises the signal again when done)."""


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Ctrl-C or SIGTERM ends the service normally (status 0, the log closed) once uvicorn has drained."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stop:
        pass
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _days(text: str) -> float:
    value = parse_number(text, "a number of days")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of days, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def add_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the inspection service: HTTP API, operator page and inspection log",
        description="Serve fitted runs over HTTP: POST /v1/models/NAME/inspect scores an image (multipart or raw "
        "body) and logs it with its image and heat map; the operator page is at /, the API docs at /docs, "
        "Prometheus metrics at /metrics. Every route but /healthz and the page needs "
        "'Authorization: Bearer TOKEN' with the first line of --token-file (default: a token made in "
        "DATA_DIR/token).",
    )
    serve.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folder written by `defectscope fit`, served under its folder name, or RUN=NAME",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s; 0: any free port)")
    serve.add_argument(
        "--db", metavar="URL", help="sqlite:///FILE or postgresql://... (default: DATA_DIR/inspections.db)"
    )
    serve.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        metavar="DIR",
        help="where images, maps and the default database are kept (default: ./%(default)s)",
    )
    serve.add_argument("--token-file", metavar="FILE", help="file whose first line is the bearer token")
    serve.add_argument("--no-auth", action="store_true", help="no token at all (only allowed on a loopback --host)")
    serve.add_argument(
        "--max-batch", type=positive_int, metavar="N", help="most images per model call (default: the run's batch)"
    )
    serve.add_argument(
        "--retention-days",
        type=_days,
        metavar="D",
        help="delete inspections (rows, images, maps) older than D days (default: keep all)",
    )
    add_device(serve)
    add_engine(serve)
    serve.set_defaults(func=run)
