"""What clients send: the uploaded image (multipart ``file`` field or raw body), feedback masks, and the
thread pool the images are decoded in, so the event loop only moves bytes."""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..data.image_io import read_image_bytes
from ..errors import DataError
from .error_handlers import one_line


class _InMemoryParts(MultiPartParser):
    """Multipart parsing that keeps the (size-limited) upload in memory: no temporary files outside the data folder."""

    spool_max_size = 1 << 62


async def _read_body(request: Request) -> bytes:
    chunks = []
    try:
        async for chunk in request.stream():
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before the body was complete") from None
    return b"".join(chunks)


async def read_upload(request: Request) -> tuple[bytes, str | None]:
    """The image bytes and the client's file name: a multipart ``file`` field, or the raw body."""
    body = await _read_body(request)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body, None

    async def once() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await _InMemoryParts(request.headers, once(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"the multipart body cannot be read: {one_line(exc.message)}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "the multipart body has no file field named 'file'")
        return await upload.read(), upload.filename
    finally:
        await form.close()


def mask_png(encoded: str) -> bytes:
    """A feedback mask (base64 image, white = defect) as a black/white 8-bit PNG."""
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise DataError("mask: not valid base64") from None
    img, _ = read_image_bytes(data, "mask")
    try:
        defect = np.asarray(img).max(axis=2) > 127
    finally:
        img.close()
    buffer = io.BytesIO()
    Image.fromarray(defect.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


class DecodePool:
    """A decoding thread pool made on first use and shut down with the app."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def get(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="serve-decode")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
