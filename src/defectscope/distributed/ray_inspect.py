"""``test --engine ray``: the test images scored on Ray workers, returned to the driver in order.

Each worker loads the run once and scores its share of the test samples with the same code as the
local ``test`` (``Detector.inspect``); the scored images (score, map, and the native pixels and
mask the report and the pixel metrics need) stream back in the order of the samples, so the metrics,
``predictions.csv`` and the report are computed on the driver exactly as for the local engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Sample
from ..engines import EngineChoice
from ..geometry.inspect import Inspected
from ..progress import progress_enabled
from .ray_data import RunWorker, on_workers
from .runtime import require_ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how ``test --engine ray`` runs: the cluster, the workers and what computes in each."""

    address: str | None = None
    workers: int = 2
    threads_per_worker: int = 1
    engine: EngineChoice | None = None


class _Inspector(RunWorker):
    """A Ray actor: the run's detector, loaded once, inspecting batches of test samples."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        samples = list(batch["sample"])
        items = list(
            self.detector.inspect(samples, batch_size=self.batch_size, native=bool(batch["native"][0]), masks=True)
        )
        column = np.empty(len(items), dtype=object)
        column[:] = items
        return {"item": column}


def inspect_ray(
    run: str | os.PathLike[str],
    samples: Sequence[Sample],
    options: RayOptions,
    *,
    native: bool,
    batch_size: int | None,
    device: str,
) -> Iterator[Inspected]:
    """``Detector.inspect(samples, masks=True, native=native)`` of the run folder ``run`` on Ray workers, in order."""
    require_ray()
    items = [{"sample": s, "native": native} for s in samples]
    dataset = on_workers(
        items,
        _Inspector,
        run=str(Path(run).resolve()),
        address=options.address,
        workers=options.workers,
        threads=options.threads_per_worker,
        batch_size=batch_size,
        device=device,
        engine=options.engine,
        ordered=True,
    )
    from tqdm import tqdm

    with tqdm(total=len(items), desc="testing on ray", unit="img", disable=not progress_enabled()) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for item in batch["item"]:
                bar.update(1)
                yield item
