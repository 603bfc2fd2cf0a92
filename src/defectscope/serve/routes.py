"""The ``/v1`` routes: inspect an image, list and fetch logged inspections and their images, give feedback.

Every one needs the bearer token. Decoding runs in the app's thread pool before the image is
queued for its model's micro-batcher (:mod:`.batching`), logging in another thread.
"""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, params
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import DataError, DefectscopeError
from ..geometry import Geometry
from .batching import MicroBatcher, ServiceBusy
from .error_handlers import one_line
from .images import overlay_png, stored_heatmap_png, stored_overlay_png
from .log_records import VERDICTS
from .metrics import ServeMetrics
from .registry import ModelRegistry, ServedModel
from .store import DEFECT_KINDS, FEEDBACK_KINDS, Inspection, InspectionLog, LogUnavailableError
from .uploads import DecodePool, mask_png, read_upload

API = "/v1"

VerdictName = Literal["good", "anomalous", "error", "none"]

_MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
}
_INSPECT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one image: a multipart form with a 'file' field, or the raw image bytes",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong bearer token"},
    404: {"description": "unknown model or inspection"},
}


class FeedbackIn(BaseModel):
    """What the operator says about one inspection."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description=f"one of {', '.join(FEEDBACK_KINDS)}")
    defect_type: str | None = Field(None, max_length=64, description="defect folder name for the export")
    note: str | None = Field(None, max_length=4000)
    mask_png_base64: str | None = Field(
        None, description="PNG (or any image) of any size, white = defect; a data: URL prefix is accepted"
    )


def inspection_json(inspection: Inspection) -> dict[str, Any]:
    """The Inspection JSON of the API: the log's fields plus the URLs of its images."""
    out = inspection.to_dict()
    base = f"{API}/inspections/{inspection.id}"
    out["image_url"] = f"{base}/image"
    out["overlay_url"] = f"{base}/overlay.png" if inspection.map else None
    out["heatmap_url"] = f"{base}/heatmap.png" if inspection.map else None
    return out


def _utc(moment: datetime | None) -> datetime | None:
    """A query time in UTC; one without a zone is taken as UTC."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def api_router(
    registry: ModelRegistry,
    log: InspectionLog,
    metrics: ServeMetrics,
    batchers: dict[str, MicroBatcher],
    decoders: DecodePool,
    auth: params.Depends,
) -> APIRouter:
    """The ``/v1`` routes over ``registry``'s models and ``log``, each behind ``auth``."""

    def served(name: str) -> ServedModel:
        model = registry.get(name)
        if model is None:
            raise HTTPException(404, f"no model named {name!r}; served: {', '.join(registry.names)}")
        return model

    def found(inspection_id: str) -> Inspection:
        row = log.get(inspection_id) if len(inspection_id) <= 64 else None
        if row is None:
            raise HTTPException(404, f"no inspection {inspection_id[:64]!r}")
        return row

    def stored(name: str | None, what: str) -> Path:
        path = log.file_path(name) if name else None
        if path is None or not path.is_file():
            raise HTTPException(404, f"the {what} of this inspection is not stored (any more)")
        return path

    v1 = APIRouter(prefix=API, dependencies=[auth], responses=_ERRORS)

    @v1.get(
        "/models",
        summary="the served models, their thresholds, logged inspections and waiting feedback",
        description=(
            "One entry per served model: what the model is (name, method, image size, sha256, "
            "threshold, rule, ...), plus\n\n"
            "- `inspections`: how many of its inspections the log holds, by verdict, "
            '`{"good": n, "anomalous": n, "error": n, "none": n, "total": n}` '
            "(0 where none; `none` is a model without a threshold; retention lowers them);\n"
            "- `feedback`: per feedback kind, how many of its inspections have that kind as their "
            "latest feedback and wait for export (0 where none)."
        ),
    )
    def models() -> list[dict[str, Any]]:
        feedback = log.feedback_counts()
        verdicts = log.verdict_counts()
        no_feedback = dict.fromkeys(FEEDBACK_KINDS, 0)
        no_inspections = dict.fromkeys(VERDICTS, 0)

        def inspections_of(name: str) -> dict[str, int]:
            counts = {**no_inspections, **verdicts.get(name, {})}
            return {**counts, "total": sum(counts.values())}

        return [
            {
                **model.describe(),
                "inspections": inspections_of(model.name),
                "feedback": feedback.get(model.name, no_feedback),
            }
            for model in registry
        ]

    @v1.post(
        "/models/{name}/inspect",
        summary="inspect one image",
        openapi_extra=_INSPECT_BODY,
        responses={
            413: {"description": "body over the upload limit"},
            422: {"description": "not an image defectscope can use"},
            503: {"description": "the model's queue is full"},
        },
    )
    async def inspect(
        name: str,
        request: Request,
        filename: Annotated[str | None, Query(max_length=1024, description="file name for the log")] = None,
        heatmap: Annotated[bool, Query(description="add the overlay PNG as heatmap_png_base64")] = False,
    ) -> JSONResponse:
        started = time.perf_counter()
        model = served(name)
        data, sent_name = await read_upload(request)
        loop = asyncio.get_running_loop()
        try:
            decoded = await loop.run_in_executor(decoders.get(), model.decode, data, filename or sent_name, heatmap)
        except DataError as exc:
            raise HTTPException(422, one_line(str(exc))) from None
        views = decoded.views
        if len(views) == 1:  # one view: micro-batched with other requests
            try:
                result = await batchers[name].submit(views.get(0, 1)[0])
            except ServiceBusy as exc:
                raise HTTPException(503, str(exc), {"Retry-After": "1"}) from None
            score, amap = model.finish(views, result.score, result.amap)
            queue_ms, model_ms = result.queue_ms, result.model_ms
        else:  # tiles: batched among themselves
            begin = time.perf_counter()
            [(score, amap)] = await run_in_threadpool(model.score, [decoded])
            queue_ms, model_ms = 0.0, (time.perf_counter() - begin) * 1000.0
        timings = {"decode_ms": decoded.decode_ms, "queue_ms": queue_ms, "model_ms": model_ms}
        inspection = await run_in_threadpool(model.record, decoded, score, amap, log, timings, started)
        metrics.verdicts.labels(name, inspection.verdict or "none").inc()
        body = inspection_json(inspection)
        if heatmap:
            assert decoded.image is not None  # decoded with its native pixels
            png = await run_in_threadpool(overlay_png, decoded.image, amap, inspection.threshold)
            body["heatmap_png_base64"] = base64.b64encode(png).decode("ascii")
        return JSONResponse(body)

    @v1.get("/inspections", summary="logged inspections, newest first")
    def inspections(
        model: Annotated[str | None, Query(description="only this model's inspections")] = None,
        verdict: Annotated[VerdictName | None, Query(description="good, anomalous, error or none")] = None,
        since: Annotated[datetime | None, Query(description="ISO 8601; without a zone, UTC")] = None,
        until: Annotated[datetime | None, Query(description="ISO 8601; without a zone, UTC")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        items, total = log.list(
            model=model, verdict=verdict, since=_utc(since), until=_utc(until), limit=limit, offset=offset
        )
        return {"items": [inspection_json(i) for i in items], "total": total, "limit": limit, "offset": offset}

    @v1.get("/inspections/{inspection_id}", summary="one logged inspection")
    def inspection(inspection_id: str) -> JSONResponse:
        return JSONResponse(inspection_json(found(inspection_id)))

    @v1.get("/inspections/{inspection_id}/image", summary="the stored input image", response_class=FileResponse)
    def image(inspection_id: str) -> FileResponse:
        path = stored(found(inspection_id).image, "image")
        return FileResponse(path, media_type=_MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    @v1.get("/inspections/{inspection_id}/overlay.png", summary="heat map over the input", response_class=Response)
    def overlay(inspection_id: str) -> Response:
        row = found(inspection_id)
        served_model = registry.get(row.model)
        # the region of interest of the model that scored it, while that model is the one served
        same = served_model is not None and served_model.sha256 == row.model_sha256
        geometry = served_model.detector.geometry if served_model is not None and same else Geometry()
        png = stored_overlay_png(stored(row.image, "image"), stored(row.map, "anomaly map"), row.threshold, geometry)
        return Response(png, media_type="image/png")

    @v1.get("/inspections/{inspection_id}/heatmap.png", summary="the anomaly map in colour", response_class=Response)
    def heatmap(inspection_id: str) -> Response:
        row = found(inspection_id)
        return Response(stored_heatmap_png(stored(row.map, "anomaly map"), row.threshold), media_type="image/png")

    @v1.post("/inspections/{inspection_id}/feedback", status_code=201, summary="the operator's word on an inspection")
    def feedback(inspection_id: str, body: FeedbackIn) -> dict[str, Any]:
        found(inspection_id)
        if body.kind not in FEEDBACK_KINDS:
            raise HTTPException(422, f"kind must be one of {', '.join(FEEDBACK_KINDS)}, got {body.kind!r}")
        mask = None
        if body.mask_png_base64:
            if body.kind not in DEFECT_KINDS:
                raise HTTPException(422, f"{body.kind}: a mask belongs to {' or '.join(DEFECT_KINDS)} feedback only")
            mask = log.store_file(mask_png(body.mask_png_base64), ".png")
        try:
            row = log.add_feedback(inspection_id, body.kind, mask=mask, defect_type=body.defect_type, note=body.note)
        except LogUnavailableError:
            raise
        except DefectscopeError as exc:  # what the log refuses (a defect type it cannot use as a folder name)
            raise HTTPException(422, one_line(str(exc))) from None
        return row.to_dict()

    return v1
