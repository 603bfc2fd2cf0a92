"""The HTTP API: :func:`create_app` builds the FastAPI app over a model registry and an inspection log.

Every route but ``/healthz``, ``/docs`` and the operator page needs ``Authorization: Bearer <token>``
(:mod:`.security`); request bodies are limited while they are read (413); an image defectscope cannot
use gets 422 with the one-line message the CLI would print, never a 500 (:mod:`.error_handlers`).
Requests for one model are micro-batched (:mod:`.batching`); decoding runs in a thread pool before
queuing, logging in another, so the event loop only moves bytes (:mod:`.routes`). Prometheus metrics
live in a registry of the app's own, so several apps can live in one process (:mod:`.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import DefectscopeError
from .batching import MicroBatcher
from .docs_page import add_docs_page, docs_html
from .error_handlers import add_error_handlers
from .metrics import ServeMetrics
from .operator_page import add_operator_page
from .registry import ModelRegistry
from .routes import API, FeedbackIn, VerdictName, api_router, inspection_json
from .security import Edge, bearer, read_token
from .settings import ServeSettings
from .store import InspectionLog
from .uploads import DecodePool

__all__ = [
    "API",
    "PAGE_DIR",
    "FeedbackIn",
    "ServeMetrics",
    "VerdictName",
    "create_app",
    "docs_html",
    "inspection_json",
    "read_token",
]

PAGE_DIR = Path(__file__).with_name("page")

_log = logging.getLogger("defectscope.serve")


def create_app(settings: ServeSettings, registry: ModelRegistry, log: InspectionLog) -> FastAPI:
    """The service over ``registry``'s models, logging to ``log`` (which the caller closes)."""
    if settings.no_auth:
        token = None
    elif settings.token_file is None:
        raise DefectscopeError("the service needs a token file (or no_auth on a loopback address)")
    else:
        token = read_token(Path(settings.token_file))
    metrics = ServeMetrics()
    decoders = DecodePool()
    batchers = {
        model.name: MicroBatcher(
            model.predict,
            max_batch=settings.max_batch or model.detector.batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            name=model.name,
            on_batch=metrics.batch(model.name),
        )
        for model in registry
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for batcher in batchers.values():
            batcher.start()
        for model in registry:
            try:
                await run_in_threadpool(model.warm_up)
            except Exception:  # a model that cannot score a blank image says so on the first request
                _log.exception("warming up %s failed", model.name)
        try:
            yield
        finally:
            for batcher in batchers.values():
                await batcher.stop()
            decoders.close()

    app = FastAPI(
        title="defectscope inspection service",
        version=__version__,
        docs_url=None,  # /docs below: the reference drawn here, not Swagger UI from a CDN (factories are offline)
        redoc_url=None,
        description="Post images to a fitted model, get score, verdict and heat map; every inspection is logged. "
        "Send 'Authorization: Bearer TOKEN' on every request but /healthz.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.log = log
    app.state.metrics = metrics
    app.state.batchers = batchers

    auth = Depends(bearer(token))
    app.include_router(api_router(registry, log, metrics, batchers, decoders, auth))

    @app.get("/healthz", summary="liveness: no token needed")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": registry.names}

    @app.get("/metrics", dependencies=[auth], summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_docs_page(app)
    add_operator_page(app, PAGE_DIR)
    add_error_handlers(app)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(Edge, metrics=metrics, max_body=settings.max_upload_bytes)
    return app
