"""Micro-batching: concurrent requests for one model share a model call.

Each model has a bounded asyncio queue and one worker. The worker takes the first waiting
request, then up to ``max_batch - 1`` more that arrive within ``max_wait_ms`` (or are already
waiting), stacks their tensors and runs the model in its own thread (torch releases the GIL, so
the event loop keeps accepting and decoding requests meanwhile). While the model is busy the
queue fills, so under load batches form without waiting at all; a lone request waits at most
``max_wait_ms``. A full queue refuses new requests (:class:`ServiceBusy`) instead of letting
latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import DefectscopeError
from ..methods import Prediction


class ServiceBusy(DefectscopeError):
    """The model's queue is full, or the service is shutting down: try again shortly (HTTP 503)."""


@dataclass(frozen=True)
class BatchedResult:
    """One request's share of a batch."""

    score: float
    amap: torch.Tensor  # (H, W)
    queue_ms: float  # queued until its batch went to the model
    model_ms: float  # the model call of its whole batch
    batch_size: int


@dataclass
class _Job:
    image: torch.Tensor
    future: asyncio.Future[BatchedResult]
    queued: float


class MicroBatcher:
    """Feeds one model in batches from an asyncio queue; start it inside the running event loop.

    ``predict`` gets a (B, 3, H, W) tensor; ``on_batch(size, seconds)`` is told of every model call.
    """

    def __init__(
        self,
        predict: Callable[[torch.Tensor], Prediction],
        *,
        max_batch: int,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be at least 1, max_wait_ms at least 0")
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.name = name
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: list[_Job] = []

    def start(self) -> None:
        """Create the queue and the worker in the running loop (idempotent)."""
        if self._task is not None and not self._task.done():
            return
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"defectscope-model-{self.name}")
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the worker; requests still waiting get :class:`ServiceBusy`."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        waiting = list(self._running)
        self._running = []
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(ServiceBusy("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken into a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, image: torch.Tensor) -> BatchedResult:
        """Queue one (3, H, W) image and wait for its result; :class:`ServiceBusy` when the queue is full."""
        self.start()
        assert self._queue is not None
        job = _Job(image, asyncio.get_running_loop().create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ServiceBusy(
                f"model {self.name}: {self.queue_size} requests are already waiting; try again shortly"
            ) from None
        return await job.future

    async def _next_batch(self, queue: asyncio.Queue[_Job]) -> list[_Job]:
        """The first waiting job, then more until the batch is full or ``max_wait`` has passed."""
        jobs = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(jobs) < self.max_batch:
            if not queue.empty():
                jobs.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return [job for job in jobs if not job.future.done()]  # a client that left cancelled its future

    async def _work(self) -> None:
        assert self._queue is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        queue, executor = self._queue, self._executor
        while True:
            jobs = await self._next_batch(queue)
            if not jobs:
                continue
            self._running = jobs
            begin = time.perf_counter()
            try:
                images = torch.stack([job.image for job in jobs])
                pred = await loop.run_in_executor(executor, self.predict, images)
            except Exception as exc:  # the model failed: every request of the batch is told, the worker goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                self._running = []
                continue
            seconds = time.perf_counter() - begin
            if self.on_batch is not None:
                self.on_batch(len(jobs), seconds)
            for i, job in enumerate(jobs):
                if not job.future.done():
                    job.future.set_result(
                        BatchedResult(
                            score=float(pred.scores[i]),
                            amap=pred.maps[i],
                            queue_ms=(begin - job.queued) * 1000.0,
                            model_ms=seconds * 1000.0,
                            batch_size=len(jobs),
                        )
                    )
            self._running = []
