"""The service's Prometheus metrics, in a registry of each app's own, so several apps can live in one process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "defectscope_requests", "HTTP requests by route and status", ("route", "status"), registry=self.registry
        )
        self.latency = Histogram(
            "defectscope_request_seconds",
            "HTTP request duration by route",
            ("route",),
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.verdicts = Counter(
            "defectscope_verdicts",
            "Logged inspections by model and verdict",
            ("model", "verdict"),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "defectscope_batch_size",
            "Images per model call",
            ("model",),
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_seconds = Histogram(
            "defectscope_model_seconds",
            "Duration of one batched model call",
            ("model",),
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )

    def batch(self, model: str) -> Callable[[int, float], None]:
        """The ``on_batch`` callback of one model's batcher."""

        def observe(size: int, seconds: float) -> None:
            self.batch_size.labels(model).observe(size)
            self.model_seconds.labels(model).observe(seconds)

        return observe
