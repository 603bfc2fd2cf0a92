"""The one training loop every trained method uses: seeded, checkpointed, resumable, budgeted.

>>> trainer = Trainer({"student": net}, optimizer, epochs=50, seed=0, checkpoint_dir=run / "checkpoint")
>>> log = trainer.run(lambda epoch: shuffled_batches(images, 8, seed=0, epoch=epoch), step)

``step(batch)`` returns the loss (a scalar tensor) or a dict of named losses whose ``"loss"``
entry is optimised; the trainer does ``zero_grad`` / ``backward`` / ``step``. Every epoch starts
from a seed derived from ``(seed, epoch)``, so a run resumed from the checkpoint of epoch k
continues exactly as the uninterrupted run would have. Checkpoints are written at the end of an
epoch (at most every ``checkpoint_every`` seconds, always at the end and when the time budget
stops training); the time budget counts training time across resumes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import flatten_optimizer, load_checkpoint, save_checkpoint, unflatten_optimizer
from .data.dataset import Batch, ItemSource, iterate_batches
from .errors import DefectscopeError
from .nn.state import under_prefix, with_prefix
from .progress import progress_enabled

StepResult = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class TrainingLog:
    """What a training run did; stored in the model's ``fit_info``."""

    epochs_done: int
    epochs_planned: int
    stopped_by: str  # "epochs" or "time budget"
    seconds: float  # training time, summed over resumed runs
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from_epoch: int | None = None


def check_schedule(epochs: int, time_budget: float | None) -> None:
    """``epochs`` is at least 1 and ``time_budget`` positive seconds or None (no limit)."""
    if epochs < 1:
        raise DefectscopeError(f"epochs must be at least 1, got {epochs}")
    if time_budget is not None and time_budget <= 0:
        raise DefectscopeError(f"time_budget must be positive seconds or None, got {time_budget}")


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed of one epoch (independent of how many epochs ran before in this process)."""
    return int(np.random.default_rng([seed, epoch, 7]).integers(2**62))


class Trainer:
    """Optimises ``modules`` with ``optimizer``; see the module docstring."""

    def __init__(
        self,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        seed: int = 0,
        time_budget: float | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        identity: dict[str, Any] | None = None,
        checkpoint_every: float = 30.0,
        lr_schedule: Callable[[int], float] | None = None,
        desc: str = "training",
        max_grad_norm: float | None = None,
    ) -> None:
        check_schedule(epochs, time_budget)
        self.modules = modules
        self.optimizer = optimizer
        self.epochs = epochs
        self.seed = seed
        self.time_budget = time_budget
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume = resume
        self.identity = identity or {}
        self.checkpoint_every = checkpoint_every
        self.lr_schedule = lr_schedule
        self.desc = desc
        self.max_grad_norm = max_grad_norm
        self._base_lrs = [group["lr"] for group in optimizer.param_groups]

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, log: TrainingLog) -> None:
        if self.checkpoint_dir is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            tensors.update(with_prefix(f"module.{name}", module))
        optim_tensors, optim_meta = flatten_optimizer(self.optimizer.state_dict(), "optimizer")
        tensors.update(optim_tensors)
        meta = {
            "identity": self.identity,
            "epoch": log.epochs_done,
            "epochs_planned": self.epochs,
            "seconds": log.seconds,
            "epoch_losses": log.epoch_losses,
            "optimizer": optim_meta,
        }
        save_checkpoint(self.checkpoint_dir, tensors, meta)

    def _restore(self, log: TrainingLog) -> None:
        """Load the checkpoint when resuming; refuse to silently overwrite one otherwise."""
        if self.checkpoint_dir is None:
            if self.resume:
                raise DefectscopeError("cannot resume: no checkpoint folder was given")
            return
        found = load_checkpoint(self.checkpoint_dir)
        if found is None:
            if self.resume:
                print(f"no checkpoint in {self.checkpoint_dir}; starting from the beginning", flush=True)
            return
        tensors, meta = found
        if not self.resume:
            raise DefectscopeError(
                f"{self.checkpoint_dir} holds a checkpoint of an earlier run (epoch {meta.get('epoch')}); "
                "resume it with --resume, or delete that folder to start over"
            )
        if meta.get("identity") != self.identity:
            raise DefectscopeError(
                f"{self.checkpoint_dir}: checkpoint was written with other settings ({meta.get('identity')}) "
                f"than this run ({self.identity}); use the same settings or delete the folder to start over"
            )
        try:
            for name, module in self.modules.items():
                module.load_state_dict(under_prefix(tensors, f"module.{name}"))
            self.optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"], "optimizer"))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise DefectscopeError(f"{self.checkpoint_dir}: checkpoint does not fit this model ({exc})") from None
        log.epochs_done = log.resumed_from_epoch = int(meta["epoch"])
        log.seconds = float(meta["seconds"])
        log.epoch_losses = list(meta["epoch_losses"])

    # -- the loop --------------------------------------------------------------------------------
    def run(self, batches: Callable[[int], Iterable[Any]], step: Callable[[Any], StepResult]) -> TrainingLog:
        """Train until ``epochs`` are done or the time budget is spent."""
        log = TrainingLog(0, self.epochs, "epochs", 0.0)
        self._restore(log)
        for module in self.modules.values():
            module.train()
        last_save = time.monotonic()
        start_seconds = log.seconds
        started = time.monotonic()
        bar: tqdm | None = None
        try:
            for epoch in range(log.epochs_done, self.epochs):
                torch.manual_seed(epoch_seed(self.seed, epoch))
                if self.lr_schedule is not None:
                    for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                        group["lr"] = base * self.lr_schedule(epoch)
                epoch_batches = batches(epoch)
                if bar is None:
                    steps = len(epoch_batches) if isinstance(epoch_batches, Sized) else 0
                    bar = tqdm(
                        total=steps * self.epochs or None,
                        initial=steps * log.epochs_done,
                        unit="step",
                        desc=self.desc,
                        disable=not progress_enabled(),
                    )
                bar.set_description(f"{self.desc} epoch {epoch + 1}/{self.epochs}", refresh=False)
                total, count, out_of_time = 0.0, 0, False
                for batch in epoch_batches:
                    losses = self._step(step, batch, epoch)
                    total += losses["loss"]
                    count += 1
                    bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
                    bar.update(1)
                    log.seconds = start_seconds + time.monotonic() - started
                    if self.time_budget is not None and log.seconds >= self.time_budget:
                        out_of_time = True
                        break
                if out_of_time:
                    log.stopped_by = "time budget"
                    break
                log.epochs_done = epoch + 1
                log.epoch_losses.append(round(total / max(count, 1), 6))
                if log.epochs_done == self.epochs or time.monotonic() - last_save >= self.checkpoint_every:
                    self._save(log)
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            where = (
                f"; the checkpoint in {self.checkpoint_dir} is kept, continue with --resume"
                if self.checkpoint_dir is not None
                else ""
            )
            print(f"\ntraining interrupted in epoch {log.epochs_done + 1}{where}", flush=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        if log.stopped_by == "time budget":
            self._save(log)
        for module in self.modules.values():
            module.eval()
        return log

    def _step(self, step: Callable[[Any], StepResult], batch: Any, epoch: int) -> dict[str, float]:
        result = step(batch)
        losses = result if isinstance(result, dict) else {"loss": result}
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise DefectscopeError(
                f"training diverged in epoch {epoch + 1} (loss {loss.item()}); lower the learning rate (--set lr=...)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}


class CachedImages:
    """Decodes a dataset once and serves its items from memory (images kept as uint8).

    Training revisits every image each epoch; decoding and resizing once saves most of that work.
    Items are the dataset's dicts with ``image`` as float in [0, 1], so this is an ItemSource.
    """

    def __init__(self, dataset: ItemSource, desc: str | None = "loading training images") -> None:
        self.items: list[dict[str, Any]] = []
        for batch in iterate_batches(dataset, batch_size=16, desc=desc):
            for i in range(len(batch["path"])):
                item: dict[str, Any] = {
                    k: (v[i] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()
                }
                item["image"] = (item["image"] * 255).round().to(torch.uint8)
                self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.items[index])
        item["image"] = item["image"].float() / 255
        return item


class _Subset:
    """The items of ``source`` at ``indices``, in that order."""

    def __init__(self, source: ItemSource, indices: np.ndarray) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[index])]


class shuffled_batches(Sized):
    """The batches of one epoch: ``source`` in an order seeded by ``(seed, epoch)``.

    Sets ``source.epoch`` first when the source has one (synthetic-anomaly datasets draw their
    anomalies per epoch). The last batch is dropped when smaller than ``min_batch`` (batch norms
    need two or more images).
    """

    def __init__(
        self, source: ItemSource, batch_size: int, *, seed: int, epoch: int, min_batch: int = 2, threads: int = 1
    ) -> None:
        if hasattr(source, "epoch"):
            source.epoch = epoch
        order = np.random.default_rng([seed, epoch]).permutation(len(source))
        self.view = _Subset(source, order)
        self.batch_size, self.min_batch, self.threads = batch_size, min_batch, threads

    def __len__(self) -> int:
        full, rest = divmod(len(self.view), self.batch_size)
        return full + (1 if rest >= self.min_batch else 0)

    def __iter__(self) -> Iterator[Batch]:
        for batch in iterate_batches(self.view, self.batch_size, threads=self.threads):
            if len(batch["path"]) >= self.min_batch:
                yield batch


def cosine_schedule(epochs: int, warmup: int = 0) -> Callable[[int], float]:
    """Learning-rate factor per epoch: linear warm-up, then cosine decay to 5 % of the base rate."""

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        progress = (epoch - warmup) / max(1, epochs - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
