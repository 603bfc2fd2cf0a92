"""The error mapping: every failure answers JSON ``{"detail": "<one line>"}``, never a traceback.

A request the API cannot use gets 422, an image defectscope cannot use 422 with the message the
CLI would print, a full queue or an inspection log that stopped answering 503, anything else 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import DataError, DefectscopeError
from .batching import ServiceBusy
from .store import LogUnavailableError

_log = logging.getLogger("defectscope.serve")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())


def add_error_handlers(app: FastAPI) -> None:
    """Map validation errors, defectscope's errors and crashes to one-line JSON answers."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return JSONResponse({"detail": one_line("; ".join(parts)) or "invalid request"}, status_code=422)

    @app.exception_handler(DataError)
    async def bad_data(request: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"detail": one_line(str(exc))}, status_code=422)

    @app.exception_handler(DefectscopeError)
    async def failed(request: Request, exc: DefectscopeError) -> JSONResponse:
        busy = isinstance(exc, (ServiceBusy, LogUnavailableError))
        return JSONResponse({"detail": one_line(str(exc))}, status_code=503 if busy else 500)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the service log"}, status_code=500)
