"""What ``predict`` and ``test`` on Ray share: the worker that loads the run once, and the Ray Data pipeline."""

from __future__ import annotations

import os
from typing import Any

from ..engines import EngineChoice
from ..runs.info import load_with_engine
from .runtime import start_ray

#: Images per call of a worker.
CHUNK = 64


class RunWorker:
    """A Ray actor's state: the run's detector, loaded once, and its batch size."""

    def __init__(
        self, run: str, device: str, engine: EngineChoice | None, threads: int, batch_size: int | None
    ) -> None:
        import torch

        from ..progress import quiet

        torch.set_num_threads(threads)
        os.environ.setdefault("DEFECTSCOPE_NO_PROGRESS", "1")
        self.detector = load_with_engine(run, device, engine, quiet)
        self.batch_size = batch_size or self.detector.batch_size


def on_workers(
    items: list[dict[str, Any]],
    worker: type[RunWorker],
    *,
    run: str,
    address: str | None,
    workers: int,
    threads: int,
    batch_size: int | None,
    device: str,
    engine: EngineChoice | None,
    ordered: bool = False,
) -> Any:
    """A Ray Data dataset of ``items`` mapped by ``workers`` actors of class ``worker`` (CHUNK items per call,
    fewer when that leaves a worker idle), in the order of ``items`` when ``ordered``."""
    ray = start_ray(address, workers * threads)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = ordered
    # each call scores CHUNK images (model batches of ``batch_size`` inside), so that image decoding
    # overlaps the model within a call; chunks small enough that every worker gets some
    per_batch = max(1, min(CHUNK, -(-len(items) // workers)))
    return ray.data.from_items(items, override_num_blocks=-(-len(items) // per_batch)).map_batches(
        worker,
        fn_constructor_kwargs={
            "run": run,
            "device": device,
            "engine": engine,
            "threads": threads,
            "batch_size": batch_size,
        },
        batch_size=per_batch,
        batch_format="numpy",
        concurrency=workers,
        num_cpus=threads,
        num_gpus=1 if device.startswith("cuda") else 0,
    )
