"""Domain adaptation of the feature extractor of a reconstruction method (DDAD, GLAD).

A copy of the frozen backbone is fine-tuned on pairs (good training image, its reconstruction):
a similarity loss (1 - cos between the copy's features of the two) plus ``da_lambda`` times a
distillation loss that keeps the copy's features of each close to the frozen backbone's. The
feature distance between an image and its reconstruction then ignores what the reconstruction
always gets slightly wrong on good parts (blur, texture detail) and keeps what it changes.
DDAD (Mousakhan et al. 2023) adapts its CNN extractor this way; GLAD's code fine-tunes its DINO
extractor with the same two losses (``lmd`` 0.1 on MVTec AD).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..training import CachedImages, shuffled_batches
from .trained import TrainedDetector


def domain_adaptation_losses(
    student: nn.Module, teacher: nn.Module, target: torch.Tensor, recon: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The similarity and distillation losses, each summed over layers of mean ``1 - cos``.

    Similarity: the adapted features of a good image and of its reconstruction should agree.
    Distillation: the adapted features of both should stay close to the frozen teacher's.
    """

    def dissimilarity(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        # One term per layer and at least one layer, so the sum is a tensor.
        return cast(
            torch.Tensor, sum((1 - torch.nn.functional.cosine_similarity(x, y, dim=1)).mean() for x, y in zip(a, b))
        )

    s_target, s_recon = student(target), student(recon)
    with torch.no_grad():
        t_target, t_recon = teacher(target), teacher(recon)
    return dissimilarity(s_target, s_recon), dissimilarity(s_target, t_target) + dissimilarity(s_recon, t_recon)


def reconstruction_pairs(
    images: CachedImages,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    *,
    count: int | None,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """A seeded subset of ``count`` good images (all when None) with ``reconstruct``'s output for each."""
    order = np.random.default_rng([seed, 13]).permutation(len(images))
    chosen = sorted(order[:count].tolist()) if count is not None else range(len(images))
    items = [images[int(i)] for i in chosen]
    pairs = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            part = items[start : start + batch_size]
            recon = reconstruct(torch.stack([item["image"] for item in part]).to(device)).cpu()
            pairs += [
                {"image": item["image"], "reconstruction": r, "path": item["path"]} for item, r in zip(part, recon)
            ]
    return pairs


def adapt_extractor(
    detector: TrainedDetector,
    teacher: nn.Module,
    pairs: list[dict[str, Any]],
    *,
    epochs: int,
    distillation_weight: float,
    lr: float,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of ``teacher`` on ``pairs`` in ``detector``'s training loop; the frozen copy and a summary."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        target, recon = batch["image"].to(detector.device), batch["reconstruction"].to(detector.device)
        similarity, distillation = domain_adaptation_losses(student, teacher, target, recon)
        return {
            "loss": similarity + distillation_weight * distillation,
            "similarity": similarity,
            "distillation": distillation,
        }

    trainer = detector.trainer(
        {"extractor": student}, optimizer, epochs=epochs, stage="domain adaptation", desc="domain adaptation"
    )
    batches = detector.batch_size
    log = trainer.run(lambda epoch: shuffled_batches(pairs, batches, seed=detector.seed, epoch=epoch), step)
    info = {
        "images": len(pairs),
        "epochs": log.epochs_done,
        "seconds": round(log.seconds, 3),
        "final_loss": log.epoch_losses[-1] if log.epoch_losses else None,
    }
    return student.eval().requires_grad_(False), info
