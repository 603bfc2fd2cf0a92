"""Ray itself: importing it with a clear error, and joining or starting a runtime."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import DefectscopeError

INSTALL_HINT = "pip install defectscope[ray]"


def require_ray() -> Any:
    """The ``ray`` module (with Ray Data), or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise DefectscopeError(
            f"--engine ray needs Ray with Ray Data ({exc}); install it with `{INSTALL_HINT}`"
        ) from None
    return ray


def start_ray(address: str | None, cpus: int) -> Any:
    """``ray``, connected to the cluster at ``address`` (``auto``, ``ray://HOST:PORT``) or, without one,
    to a local runtime of ``cpus`` CPUs; an already connected process stays as it is."""
    ray = require_ray()
    if not ray.is_initialized():
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
    return ray
