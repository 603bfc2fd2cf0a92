"""Detectors that train networks: one place for epochs, time budget, checkpoints and resuming.

A subclass builds its networks and optimizer in ``_fit`` and calls :meth:`TrainedDetector.train`,
which runs the shared :class:`~defectscope.training.Trainer` with this detector's seed, budget,
checkpoint folder and device. ``fit(data, checkpoint_dir=..., resume=True)`` continues an
interrupted run from its last checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self

import torch

from ..data import ImageDataset, Sample
from ..errors import DefectscopeError
from ..training import StepResult, Trainer, TrainingLog
from .base import Detector

# Parameters that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("time_budget", "batch_size")


class TrainedDetector(Detector):
    """Base of methods trained by gradient descent (distillation, DRAEM, diffusion, ...)."""

    def __init__(self, *, epochs: int, lr: float, time_budget: float | None, **common: Any) -> None:
        super().__init__(**common)
        if epochs < 1:
            raise DefectscopeError(f"epochs must be at least 1, got {epochs}")
        if lr <= 0:
            raise DefectscopeError(f"lr must be positive, got {lr}")
        if time_budget is not None and time_budget <= 0:
            raise DefectscopeError(f"time_budget must be positive seconds or None, got {time_budget}")
        self.epochs = epochs
        self.lr = lr
        self.time_budget = time_budget
        self.checkpoint_dir: Path | None = None
        self.resume = False
        self.training_log: TrainingLog | None = None

    def fit(self, data: str | os.PathLike | ImageDataset | Iterable[Sample], *,
            defects: Iterable[Sample] | None = None, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = False) -> Self:
        """Fit as :meth:`Detector.fit`; with ``checkpoint_dir`` training state is saved there as it goes,
        and ``resume=True`` continues from the checkpoint found there."""
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume = resume
        return super().fit(data, defects=defects)

    def train(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
              batches: Callable[[int], Iterable[Any]], step: Callable[[Any], StepResult], *,
              lr_schedule: Callable[[int], float] | None = None, desc: str | None = None,
              max_grad_norm: float | None = None, checkpoint_every: float = 30.0) -> TrainingLog:
        """Run the shared training loop over ``modules`` (already on ``self.device``)."""
        params = {k: v for k, v in self.get_params().items() if k not in RESUMABLE_CHANGES}
        trainer = Trainer(modules, optimizer, epochs=self.epochs, seed=self.seed, time_budget=self.time_budget,
                          checkpoint_dir=self.checkpoint_dir, resume=self.resume,
                          identity={"method": self.name, "params": params}, lr_schedule=lr_schedule,
                          desc=desc or f"training {self.name}", max_grad_norm=max_grad_norm,
                          checkpoint_every=checkpoint_every)
        self.training_log = trainer.run(batches, step)
        return self.training_log

    def _fit_details(self) -> dict[str, Any]:
        if self.training_log is None:
            return {}
        log = asdict(self.training_log)
        return {"training": {k: log[k] for k in ("epochs_done", "epochs_planned", "stopped_by", "seconds",
                                                 "resumed_from_epoch")} | {"final_loss": (log["epoch_losses"] or [None])[-1]}}
