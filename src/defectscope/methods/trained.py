"""Detectors that train networks: one place for epochs, time budget, checkpoints and resuming.

A subclass builds its networks and optimizer in ``_fit`` and calls :meth:`TrainedDetector.train`,
which runs the shared :class:`~defectscope.training.Trainer` with this detector's seed, budget,
checkpoint folder and device. ``fit(data, checkpoint_dir=..., resume=True)`` continues an
interrupted run from its last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import DefectscopeError
from ..geometry import Geometry
from ..training import StepResult, Trainer, TrainingLog, check_schedule
from .base import Detector

# Parameters that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("time_budget", "batch_size")


class TrainedDetector(Detector):
    """Base of methods trained by gradient descent (distillation, DRAEM, diffusion, ...)."""

    def __init__(self, *, epochs: int, lr: float, time_budget: float | None, **common: Any) -> None:
        super().__init__(**common)
        check_schedule(epochs, time_budget)
        if lr <= 0:
            raise DefectscopeError(f"lr must be positive, got {lr}")
        self.epochs = epochs
        self.lr = lr
        self.time_budget = time_budget
        self.checkpoint_dir: Path | None = None
        self.resume = False
        self.training_log: TrainingLog | None = None

    def _start_run(self, checkpoint_dir: Path | None, resume: bool) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume

    def trainer(
        self,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int | None = None,
        time_budget: float | None = None,
        stage: str | None = None,
        desc: str | None = None,
        **options: Any,
    ) -> Trainer:
        """The shared training loop over ``modules`` (already on ``self.device``) for this run.

        By default it trains ``epochs`` within ``time_budget`` with checkpoints in ``checkpoint_dir``;
        a later ``stage`` (e.g. DDAD's domain adaptation) gives its own epochs, no budget unless
        given, and keeps its checkpoints in a subfolder of that name.
        """
        params = {k: v for k, v in self.get_params().items() if k not in RESUMABLE_CHANGES}
        identity: dict[str, Any] = {"method": self.name, "params": params}
        if self.geometry != Geometry():  # a checkpoint trained on other views cannot be continued
            identity["geometry"] = self.geometry.to_json()
        checkpoint_dir = self.checkpoint_dir
        if stage is None:
            epochs, time_budget = self.epochs, self.time_budget
        else:
            identity["stage"] = stage
            if checkpoint_dir is not None:
                checkpoint_dir = checkpoint_dir / stage.replace(" ", "_")
        if epochs is None:
            raise ValueError(f"training stage {stage!r} needs its number of epochs")
        return Trainer(
            modules,
            optimizer,
            epochs=epochs,
            seed=self.seed,
            time_budget=time_budget,
            checkpoint_dir=checkpoint_dir,
            resume=self.resume,
            identity=identity,
            desc=desc or f"training {self.name}",
            **options,
        )

    def train(
        self,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        batches: Callable[[int], Iterable[Any]],
        step: Callable[[Any], StepResult],
        *,
        lr_schedule: Callable[[int], float] | None = None,
        desc: str | None = None,
        max_grad_norm: float | None = None,
        checkpoint_every: float = 30.0,
    ) -> TrainingLog:
        """Run the main training of this method; its log goes to ``fit_info["training"]``."""
        trainer = self.trainer(
            modules,
            optimizer,
            lr_schedule=lr_schedule,
            desc=desc,
            max_grad_norm=max_grad_norm,
            checkpoint_every=checkpoint_every,
        )
        self.training_log = trainer.run(batches, step)
        return self.training_log

    def _fit_details(self) -> dict[str, Any]:
        if self.training_log is None:
            return {}
        log = asdict(self.training_log)
        return {
            "training": {
                k: log[k] for k in ("epochs_done", "epochs_planned", "stopped_by", "seconds", "resumed_from_epoch")
            }
            | {"final_loss": (log["epoch_losses"] or [None])[-1]}
        }
