"""What ``defectscope serve`` is configured with: one plain dataclass, filled by the CLI or a test."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..engines import EngineChoice

#: Largest request body accepted (an image upload, a feedback mask): 64 MiB.
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """Settings of one service.

    ``db_url`` None means a SQLite file under ``data_dir``; ``token_file`` holds the bearer token
    on its first line and is required unless ``no_auth``. ``max_batch`` caps the images one model
    call takes (None: the run's own batch size), ``max_wait_ms`` is how long a batch waits for more
    requests after its first, ``queue_size`` how many requests may wait per model before new ones
    get 503. ``cors_origins`` empty keeps CORS off.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    db_url: str | None = None
    data_dir: Path = Path("defectscope-data")
    token_file: Path | None = None
    no_auth: bool = False
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_batch: int | None = None
    max_wait_ms: float = 5.0
    queue_size: int = 256
    retention_days: float | None = None
    cors_origins: tuple[str, ...] = ()
    device: str = "cpu"
    #: What computes predictions (torch, or an exported graph in onnxruntime / OpenVINO).
    engine: EngineChoice = field(default_factory=EngineChoice)
