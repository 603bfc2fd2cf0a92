"""FYD: coarse-to-fine alignment (spatial transformers, non-contrastive fine stage) before per-position Gaussians."""

from .detector import FYD

__all__ = ["FYD"]
