"""The downstream test of generated defects (Hu et al. 2024, Table 2): train a localiser on them.

A defect generator is worth what its pairs teach a segmenter. One localiser, DRAEM's
discriminative U-Net taking the image alone (3 channels, 2 logit channels), is trained with focal
loss on the good training images (all-zero masks) plus the (image, mask) pairs of ONE source
(generated, Perlin texture, CutPaste, Crop&Paste) for a fixed number of steps, and its final
model is evaluated once on held-out real defects and good test images (see
:mod:`.localiser_data`). Every source gets the same network, size, steps, batches and seed, so
the metrics compare the sources and nothing else.

Each training item is a pair with probability ``anomaly_share`` and a good image otherwise, so
the balance of good and anomalous images does not depend on how many pairs a source has. The
anomaly map is the softmax anomaly channel at ``image_size``; the image score is the maximum of
that map after a ``score_window`` x ``score_window`` mean filter (as DRAEM scores images).
Metrics are computed at ``image_size`` against the masks resized to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageDataset, Sample, iterate_batches
from ..errors import DefectscopeError
from ..methods.draem import DISCRIMINATIVE_LEVELS
from ..metrics import compute_metrics
from ..nn.blocks import EncoderDecoder
from ..nn.losses import focal_loss
from ..progress import Log, quiet
from ..training import CachedImages, Trainer, TrainingLog, cosine_schedule

#: Training steps per Trainer epoch: the learning-rate schedule and checkpoints move in these units.
EPOCH_STEPS = 50

METRIC_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "image_auroc", "image_ap", "image_f1_max")


@dataclass(frozen=True)
class LocaliserSettings:
    """How every localiser of one comparison is trained and scored (the same for all sources)."""

    image_size: int = 128  # square working size; divisible by 32 (five poolings)
    width: int = 8  # channels of the finest level; DRAEM's multipliers (1, 2, 4, 8, 8, 8) give the rest
    steps: int = 500  # optimiser steps (the budget)
    batch_size: int = 8
    lr: float = 1e-3  # Adam, cosine decay to 5 % over the steps
    anomaly_share: float = 0.5  # chance that a training item is a pair rather than a good image
    focal_gamma: float = 2.0
    score_window: int = 21  # side of the mean filter of the image score
    time_budget: float | None = None  # seconds; a safety cap, the comparison is by steps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise DefectscopeError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        for name in ("width", "steps", "score_window"):
            if getattr(self, name) < 1:
                raise DefectscopeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise DefectscopeError(f"batch_size must be at least 2 (batch norm), got {self.batch_size}")
        if not 0.0 < self.anomaly_share < 1.0:
            raise DefectscopeError(f"anomaly_share must be in (0, 1), got {self.anomaly_share}")
        if self.lr <= 0 or self.focal_gamma < 0:
            raise DefectscopeError(
                f"lr must be positive and focal_gamma non-negative, got {self.lr}, {self.focal_gamma}"
            )
        if self.time_budget is not None and self.time_budget <= 0:
            raise DefectscopeError(f"time_budget must be positive seconds or None, got {self.time_budget}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return asdict(self)


class Localiser(EncoderDecoder):
    """DRAEM's discriminative U-Net on the image alone: (B, 3, H, W) -> (B, 2, H, W) logits (good, anomaly)."""

    def __init__(self, width: int) -> None:
        super().__init__(3, 2, [width * m for m in DISCRIMINATIVE_LEVELS], skips=True)
        self.training_log: TrainingLog | None = None


def pooled_image_score(maps: torch.Tensor, size: int = 21) -> torch.Tensor:
    """Image scores (B,) of anomaly maps (B, H, W): the maximum of the ``size`` x ``size`` local means.

    The mean filter runs with stride 1 over windows lying wholly inside the map (no padding), so
    one hot pixel counts ``1 / size**2`` and only a region filling a window reaches its own
    value; a map smaller than the window is averaged over the largest window that fits.
    """
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"maps must be a non-empty (B, H, W) tensor, got shape {tuple(maps.shape)}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    side = min(size, maps.shape[1], maps.shape[2])
    return F.avg_pool2d(maps[:, None].float(), side, stride=1).flatten(1).amax(1)


def anomaly_maps(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The anomaly probability (B, H, W) a two-class segmenter gives images (B, 3, H, W)."""
    model.eval()
    with torch.no_grad():
        return model(images).softmax(1)[:, 1]


class _MixedBatches(Sized):
    """One epoch's batches: each item a pair with probability ``anomaly_share``, else a good image; seeded."""

    def __init__(
        self, good: CachedImages, pairs: CachedImages, settings: LocaliserSettings, epoch: int, steps: int
    ) -> None:
        rng = np.random.default_rng([settings.seed, epoch])
        n = steps * settings.batch_size
        from_pairs = rng.random(n) < settings.anomaly_share
        index = np.where(from_pairs, rng.integers(len(pairs), size=n), rng.integers(len(good), size=n))
        self.items = [(pairs if p else good, int(i)) for p, i in zip(from_pairs, index)]
        self.batch_size = settings.batch_size

    def __len__(self) -> int:
        return len(self.items) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.items), self.batch_size):
            chosen = [source[i] for source, i in self.items[start : start + self.batch_size]]
            yield torch.stack([c["image"] for c in chosen]), torch.stack([c["mask"] for c in chosen])


def _pair_samples(pairs: Sequence[tuple[Path, Path]]) -> list[Sample]:
    return [Sample(Path(image), 1, "pair", Path(mask), "pairs") for image, mask in pairs]


def train_localiser(
    good: Sequence[Path], pairs: Sequence[tuple[Path, Path]], settings: LocaliserSettings, *, log: Log = quiet
) -> Localiser:
    """Train a :class:`Localiser` on good images (all-zero masks) plus (image, mask) pairs, for ``settings.steps``.

    The returned model is in eval mode; ``model.training_log`` says how long it trained and why it stopped.
    """
    if len(good) < 1 or len(pairs) < 1:
        raise DefectscopeError(f"a localiser needs good images and anomalous pairs, got {len(good)} and {len(pairs)}")
    size = settings.image_size
    good_items = CachedImages(ImageDataset([Sample(Path(p), 0, "good", None, "good") for p in good], size), desc=None)
    pair_items = CachedImages(ImageDataset(_pair_samples(pairs), size), desc=None)
    empty = sum(not item["mask"].any() for item in pair_items.items)
    log(
        f"training a localiser on {len(good_items)} good images and {len(pair_items)} pairs at {size} px "
        f"for {settings.steps} steps of {settings.batch_size}"
        + (f"; {empty} pairs have an empty mask at {size} px and teach good pixels only" if empty else "")
    )
    torch.manual_seed(settings.seed)
    model = Localiser(settings.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    epochs = -(-settings.steps // EPOCH_STEPS)

    def batches(epoch: int) -> _MixedBatches:
        steps = min(EPOCH_STEPS, settings.steps - epoch * EPOCH_STEPS)
        return _MixedBatches(good_items, pair_items, settings, epoch, steps)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, masks = batch
        return focal_loss(model(images), masks.long(), settings.focal_gamma)

    trainer = Trainer(
        {"localiser": model},
        optimizer,
        epochs=epochs,
        seed=settings.seed,
        time_budget=settings.time_budget,
        lr_schedule=cosine_schedule(epochs),
        desc="training localiser",
    )
    model.training_log = trainer.run(batches, step)
    log(f"trained for {model.training_log.seconds:.0f} s (stopped by {model.training_log.stopped_by})")
    return model


def evaluate_localiser(
    model: torch.nn.Module, evaluation: Sequence[Sample], settings: LocaliserSettings, *, batch_size: int = 16
) -> dict[str, float]:
    """Pixel AUROC / AP / F1-max, AUPRO (FPR 0.3) and image AUROC / AP / F1-max of ``model`` on ``evaluation``.

    ``evaluation`` holds good and defective samples with masks; maps and masks are compared at
    ``settings.image_size``, image scores are :func:`pooled_image_score` of the maps.
    """
    labels = [s.label for s in evaluation]
    if 0 not in labels or 1 not in labels:
        raise DefectscopeError(f"an evaluation needs good and defective images, got {len(evaluation)} of one kind")
    missing = [s.path for s in evaluation if s.label == 1 and s.mask_path is None]
    if missing:
        raise DefectscopeError(f"{missing[0]}: defect image without a mask; pixel metrics need every defect's region")
    maps, masks = [], []
    for batch in iterate_batches(ImageDataset(evaluation, settings.image_size), batch_size, desc="evaluating"):
        maps.append(anomaly_maps(model, batch["image"]))
        masks.append(batch["mask"])
    all_maps = torch.cat(maps)
    scores = pooled_image_score(all_maps, settings.score_window)
    metrics = compute_metrics(np.array(labels), scores.numpy(), torch.cat(masks).numpy(), all_maps.numpy())
    return {key: float(metrics[key]) for key in METRIC_KEYS}
