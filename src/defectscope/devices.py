"""The torch device a run asks for, checked once with one clear line when it cannot be used."""

from __future__ import annotations

import torch

from .errors import DefectscopeError


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device (cpu, or cuda / cuda:N where torch sees a GPU); a DefectscopeError otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DefectscopeError(f"device {device!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DefectscopeError(f"device {device}: no CUDA GPU is available to torch here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise DefectscopeError(f"device {device}: only cpu and cuda are supported")
    return device
