"""``fit --engine ray``: the parts of a fit that split over images run on Ray workers.

:class:`RayShards` is what a method's ``shards`` attribute holds. PaDiM accumulates its
per-position sums on each worker over its share of the fitting images and merges them exactly
(:meth:`~defectscope.nn.gaussian.StreamingGaussian.merged`); PatchCore keeps a greedy coreset of
each worker's patches and runs greedy k-center again on their union. Calibration, saving and
everything else stay on the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import DefectscopeError
from .runtime import start_ray


class RayShards:
    """Runs functions on ``workers`` Ray workers of ``threads`` CPUs each (a local runtime unless ``address``)."""

    def __init__(self, workers: int = 2, threads: int = 1, address: str | None = None) -> None:
        if workers < 1 or threads < 1:
            raise DefectscopeError(f"--workers and --threads-per-worker must be at least 1, got {workers}, {threads}")
        self.ray = start_ray(address, workers * threads)
        self.workers, self.threads = workers, threads

    def map(self, fn: Callable[[Any], Any], args: list[Any]) -> list[Any]:
        remote = self.ray.remote(num_cpus=self.threads)(_in_worker)
        return list(self.ray.get([remote.remote(fn, a, self.threads) for a in args]))


def _in_worker(fn: Callable[[Any], Any], arg: Any, threads: int) -> Any:
    import os

    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("DEFECTSCOPE_NO_PROGRESS", "1")
    return fn(arg)
