"""What the methods that fit on several workers share (``fit --engine ray``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..data.dataset import ItemSource, Picked


class Shards(Protocol):
    """Where a fit's parts run (:class:`defectscope.distributed.RayShards`): ``map`` calls ``fn`` on each of
    ``args`` on a worker of its own and returns the results in order."""

    workers: int

    def map(self, fn: Callable[[Any], Any], args: list[Any]) -> list[Any]: ...


def shard_sources(source: ItemSource, shards: Shards) -> list[Picked]:
    """``source`` dealt out to the workers: every ``n``-th item, so each part sees every kind of image."""
    n = max(1, min(shards.workers, len(source)))
    return [Picked(source, list(range(i, len(source), n))) for i in range(n)]
