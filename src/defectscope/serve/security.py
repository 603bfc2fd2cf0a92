"""What guards the service: the bearer token, the upload limit and the security headers.

:class:`Edge` is the outermost ASGI middleware: it limits request bodies while they are read
(413), adds the security headers to every answer and counts each request in the app's metrics.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import HTTPException, Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import DefectscopeError
from .metrics import ServeMetrics
from .routes import API

# The pages' scripts and styles are their own files: no inline script, nothing from another host.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def read_token(path: Path) -> str:
    """The bearer token: the first line of ``path``, stripped; one-line errors for an unusable file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DefectscopeError(f"{path}: token file is not UTF-8 text") from None
    except OSError as exc:
        raise DefectscopeError(f"{path}: cannot read the token file ({exc.strerror or exc})") from None
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise DefectscopeError(f"{path}: token file is empty; put the token on its first line")
    if not all(33 <= ord(c) < 127 for c in token):
        raise DefectscopeError(f"{path}: the token must be printable ASCII without spaces")
    return token


def bearer(token: str | None) -> Callable[[Request], Awaitable[None]]:
    """The auth dependency: constant-time comparison with the configured token (None: no auth)."""
    expected = token.encode() if token is not None else None

    async def require(request: Request) -> None:
        if expected is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HTTPException(
                401, "missing bearer token: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), expected):
            raise HTTPException(401, "wrong bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    return require


class Edge:
    """ASGI middleware at the edge: the body limit while reading, security headers, request metrics."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, max_body: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        received = 0
        checked = False
        limit = self.max_body

        async def limited() -> Message:
            nonlocal received, checked
            if not checked:
                checked = True
                declared = dict(scope["headers"]).get(b"content-length", b"")
                if declared.isdigit() and int(declared) > limit:
                    raise HTTPException(413, f"the request body is {int(declared)} bytes, over the limit of {limit}")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"the request body is over the limit of {limit} bytes")
            return message

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.setdefault("x-content-type-options", "nosniff")
                headers.setdefault("referrer-policy", "no-referrer")
                headers.setdefault("x-frame-options", "DENY")
                if str(scope.get("path", "")).startswith(API):
                    headers.setdefault("cache-control", "no-store")
            await send(message)

        try:
            await self.app(scope, limited, sending)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)
