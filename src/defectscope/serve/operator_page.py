"""The operator page: ``index.html`` at ``/``, its files under ``/static/`` and beside it (no token needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from .security import PAGE_POLICY

_PAGE_MISSING = (
    "<!doctype html><meta charset=utf-8><title>defectscope</title>"
    "<p>The operator page is not installed with this copy of defectscope. The API is at "
    '<a href="/docs">/docs</a>.</p>'
)


def add_operator_page(app: FastAPI, page_dir: Path) -> None:
    """Serve the page in ``page_dir``; without its ``index.html``, ``/`` says the page is not installed."""
    index = page_dir / "index.html"
    headers = {"content-security-policy": PAGE_POLICY}

    @app.get("/", include_in_schema=False, response_model=None)
    def page() -> Response:
        if not index.is_file():
            return HTMLResponse(_PAGE_MISSING, headers=headers)
        return FileResponse(index, media_type="text/html", headers=headers)

    if not page_dir.is_dir():
        return
    app.mount("/static", StaticFiles(directory=page_dir), name="static")
    for file in sorted(page_dir.iterdir()):  # index.html may name its files relative to "/"
        if file.is_file() and file.name != "index.html":
            app.add_api_route(
                f"/{file.name}", _page_file(file), methods=["GET"], include_in_schema=False, response_model=None
            )


def _page_file(path: Path) -> Callable[[], FileResponse]:
    def serve() -> FileResponse:
        return FileResponse(path)

    return serve
