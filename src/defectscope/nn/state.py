"""Naming the tensors of several networks in one flat state dict (model files, checkpoints)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def with_prefix(prefix: str, state: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` (a state dict, or a module's) with every key written ``"{prefix}.{key}"``."""
    tensors = state.state_dict() if isinstance(state, torch.nn.Module) else state
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def under_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` named ``"{prefix}.{key}"``, keyed by ``key``: the inverse of :func:`with_prefix`."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}
