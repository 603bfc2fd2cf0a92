"""FYD (Zheng et al., "Focus Your Distribution: Coarse-to-Fine Non-Contrastive Learning for Anomaly
Detection and Localization", ICME 2022, arXiv 2110.04538).

PaDiM fits one Gaussian per position and so assumes every image shows the part at the same place.
FYD aligns first, coarse to fine, then fits those Gaussians on the aligned features:

1. Image-level coarse alignment: a spatial transformer (a small CNN on a 64 px grey, blurred,
   standardised thumbnail) predicts one affine map per image: rotation, scale and shift, bounded by
   tanh to ``max_rotation`` degrees, ``max_scale`` and ``max_shift`` of the side. Its last layer
   starts at zero (the identity); it runs twice, the second pass correcting the first within the
   same bounds. It is trained so that the aligned good images agree: the mean squared difference of
   each aligned thumbnail to a template, the running mean (momentum 0.9, stop-gradient) of the
   aligned thumbnails, initialised to the mean training thumbnail.
2. Feature-level coarse alignment: a smaller spatial transformer after each used backbone stage, on
   that stage's output; the warped output feeds the next stage. Its ranges are ``feature_range``
   times the image-level ones (a residual correction).
3. Fine alignment, non-contrastive: SimSiam projector and predictor (1 x 1 convolutions, so each
   position is a sample) on every used layer's aligned features; the loss is the negative cosine
   similarity of each image's prediction to the stop-gradient projections of its neighbours in the
   batch at the same position. It trains the feature-level transformers.
4. Scoring (PaDiM, inherited): a per-position Gaussian on the aligned s8 + s16 features, the
   Mahalanobis distance map in the aligned frame, upsampled and smoothed, then warped back by the
   inverse of the composed maps so that it lies on the input image; image score = map maximum.

Our choices where the paper gives none:

- The backbone stays frozen and pretrained (as PaDiM's); the non-contrastive heads only train the
  feature-level transformers and are not saved. Training thumbnails (step 1) and cached stage
  outputs (step 3) are first moved by random affine maps within the ranges, so the transformers
  learn to undo misalignment even when the training set is aligned.
- Pose losses on the composed maps' (angle, log scale, shift): ``anchor_weight`` times their
  squared batch mean anchors the canonical frame at the average pose of the training images (no
  drift), and ``prior_weight`` times their mean square relative to the ranges keeps each image near
  the identity unless moving it pays.
- Selection (``select_alignment``): a quarter of the alignment images is held out, Gaussians are
  fitted on the rest with and without the image-level alignment, and the alignment (both levels)
  is kept only if it lowers the held-out features' negative log-likelihood by at least ``min_gain``
  (5 %); otherwise every transformer predicts the identity and FYD scores as PaDiM does. On
  bottle the image level lowers it by 7 % (aligned images) to 51 % (moved ones); on mtd, a texture
  without a stable pose, by under 1 % or not at all.
- Training runs in two stages of the shared loop: image alignment (``epochs``, Adam ``lr``) and fine
  alignment (``fine_epochs``, checkpoints in a sub-folder). ``time_budget`` (default 300 s) caps
  both together: the fine stage gets what the image stage left, at least a tenth of it. Both train
  on at most ``max_train_images`` (seeded subset) of the fitting images; the Gaussians use all.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ...backbones import LAYERS
from ...data import ImageDataset, iterate_batches
from ...data.dataset import Picked
from ...errors import DefectscopeError
from ...nn.embedding import patch_embedding
from ...nn.gaussian import StreamingGaussian, mahalanobis
from ...nn.state import under_prefix, with_prefix
from ...postprocess import anomaly_maps
from ...thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from ...training import shuffled_batches
from ..base import Prediction, fitted
from ..padim import PaDiM
from ..params import base_params, check_at_least, check_between
from ..trained import TrainedDetector
from .alignment import (
    FeatureAligner,
    ImageAligner,
    Ranges,
    SiameseHead,
    compose,
    invert,
    pose,
    random_affine,
    switch_off,
    warp,
)

#: Momentum of the running template of the image-level alignment.
TEMPLATE_MOMENTUM = 0.9


class _Rows:
    """An item source of precomputed tensors (stored as float16), one per training image."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows.to(torch.float16)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"path": str(index), "x": self.rows[index].float()}


class FYD(TrainedDetector, PaDiM):
    """Coarse-to-fine alignment (image and feature spatial transformers, non-contrastive fine stage) before
    PaDiM's per-position Gaussians."""

    name = "fyd"
    nonnegative_scores = True
    export_unsupported = None
    param_help: ClassVar[dict[str, str]] = {
        "n_channels": "most embedding channels the Gaussians model (a seeded random subset; none: all)",
        "eps": "added to the covariance diagonal",
        "align_size": "side of the thumbnail the image-level transformer sees",
        "max_rotation": "largest rotation of the image-level transformer, degrees",
        "max_scale": "largest relative scale change of the image-level transformer",
        "max_shift": "largest shift of the image-level transformer, share of the side",
        "feature_range": "ranges of the feature-level transformers, as a share of the image-level ones",
        "proj_dim": "width of the non-contrastive projector and predictor",
        "max_train_images": "most fitting images the alignment trains on (seeded subset; none: all)",
        "select_alignment": "keep the alignment only if it makes held-out good images clearly more likely",
        "min_gain": "share by which the image level must lower the held-out negative log-likelihood to be kept",
        "fine_epochs": "epochs of the fine (non-contrastive) alignment stage; 0 skips it",
        "anchor_weight": "weight of the loss keeping the mean pose of the training images at the identity",
        "prior_weight": "weight of the loss keeping each image's pose near the identity (relative to the ranges)",
    }

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: tuple[str, ...] = ("s8", "s16"),
        weights: str | None = None,
        image_size: int = 256,
        n_channels: int | None = 160,
        neighbourhood: int = 1,
        eps: float = 0.01,
        blur_sigma: float = 4.0,
        align_size: int = 64,
        max_rotation: float = 20.0,
        max_scale: float = 0.15,
        max_shift: float = 0.15,
        feature_range: float = 0.25,
        proj_dim: int = 128,
        anchor_weight: float = 1.0,
        prior_weight: float = 0.1,
        max_train_images: int | None = 300,
        select_alignment: bool = True,
        min_gain: float = 0.05,
        epochs: int = 60,
        fine_epochs: int = 8,
        lr: float = 2e-3,
        time_budget: float | None = 300.0,
        batch_size: int = 16,
        calibration_fraction: float = 0.1,
        threshold_rule: ThresholdRule = DEFAULT_RULE,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        false_alarm_confidence: float | None = None,
        target_recall: float = DEFAULT_TARGET_RECALL,
        threshold_sigmas: float = 3.0,
        seed: int = 0,
    ) -> None:
        super().__init__(**base_params(FYD, locals()))
        if align_size < 32 or align_size % 16:
            raise DefectscopeError(f"align_size must be a multiple of 16 and at least 32, got {align_size}")
        check_between(0.0, 90.0, max_rotation=max_rotation)
        check_between(0.0, 0.5, max_scale=max_scale, max_shift=max_shift)
        check_between(0.0, 1.0, feature_range=feature_range, min_gain=min_gain)
        check_at_least(8, proj_dim=proj_dim)
        check_at_least(0, fine_epochs=fine_epochs, anchor_weight=anchor_weight, prior_weight=prior_weight)
        check_at_least(2, max_train_images=max_train_images)
        self.align_size = align_size
        self.max_rotation, self.max_scale, self.max_shift = max_rotation, max_scale, max_shift
        self.feature_range = feature_range
        self.proj_dim = proj_dim
        self.anchor_weight = anchor_weight
        self.prior_weight = prior_weight
        self.max_train_images = max_train_images
        self.select_alignment = select_alignment
        self.min_gain = min_gain
        self.fine_epochs = fine_epochs
        self._image_aligner: ImageAligner | None = None
        self._feature_aligners: nn.ModuleList | None = None
        self._fine_info: dict[str, Any] = {}

    # -- networks ----------------------------------------------------------------------------------
    @property
    def ranges(self) -> Ranges:
        return Ranges(self.max_rotation, self.max_scale, self.max_shift)

    def _build(self) -> tuple[ImageAligner, nn.ModuleList]:
        image = ImageAligner(self.align_size, self.ranges)
        feature_ranges = self.ranges.scaled(self.feature_range)
        by_layer = dict(zip(self.layers, self.extractor.channels))
        features = nn.ModuleList(FeatureAligner(by_layer[name], feature_ranges) for name in self._used_stages())
        return image.to(self.device), features.to(self.device)

    @property
    def image_aligner(self) -> ImageAligner:
        return fitted(self, self._image_aligner)

    @property
    def feature_aligners(self) -> nn.ModuleList:
        return fitted(self, self._feature_aligners)

    def _used_stages(self) -> list[str]:
        """The used layers in the order the backbone computes them."""
        return [name for name in LAYERS if name in self.layers]

    def _first_stage(self, images: torch.Tensor) -> torch.Tensor:
        """The output of the first used stage (not yet aligned) for image-aligned ``images``."""
        x = self.extractor.normalize(images).contiguous(memory_format=torch.channels_last)
        first = self._used_stages()[0]
        for name, stage in zip(LAYERS, self.extractor.stages):
            x = stage(x)
            if name == first:
                return x
        raise AssertionError("the extractor keeps every stage up to the deepest used layer")

    def _aligned_stages(
        self, first: torch.Tensor, shake: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """From the first used stage's output on: a feature transformer after every used stage, its warped
        output feeding the next stage. Returns the used layers (``layers`` order), each brought into the final
        frame with one interpolation, and the map (B, 2, 3) from that frame to the image-aligned frame.
        ``shake`` (training) first moves the first stage's output by known maps."""
        used = self._used_stages()
        aligners = dict(zip(used, self.feature_aligners))
        raws: list[torch.Tensor] = []
        thetas: list[torch.Tensor] = []
        x = first
        for name, stage in zip(LAYERS[LAYERS.index(used[0]) :], self.extractor.stages[LAYERS.index(used[0]) :]):
            if raws:
                x = stage(x)
            if name not in aligners:
                continue
            if shake is not None and not raws:
                theta = compose(shake, aligners[name](warp(x, shake)))
            else:
                theta = aligners[name](x)
            raws.append(x)
            thetas.append(theta)
            x = warp(x, theta)
            if len(raws) == len(used):
                break
        outs: dict[str, torch.Tensor] = {}
        total = None
        for name, raw, theta in reversed(list(zip(used, raws, thetas))):
            total = theta if total is None else compose(theta, total)
            outs[name] = warp(raw, total)
        assert total is not None  # at least one layer
        return [outs[name] for name in self.layers], total

    def align(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Aligned features (on the CPU, ``layers`` order) and the maps (B, 2, 3) from their frame to the input."""
        aligned, theta_image = self.image_aligner(images)
        features, theta_features = self._aligned_stages(self._first_stage(aligned))
        return [f.float().cpu() for f in features], compose(theta_image, theta_features).float().cpu()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The aligned features: what PaDiM's Gaussians are fitted on."""
        return self.align(images.to(self.device))[0]

    # -- fitting ---------------------------------------------------------------------------------------
    def _training_images(self, dataset: ImageDataset) -> torch.Tensor:
        """A seeded subset of at most ``max_train_images`` fitting images, decoded once, as uint8."""
        n = len(dataset)
        keep = list(range(n))
        if self.max_train_images is not None and n > self.max_train_images:
            keep = sorted(np.random.default_rng(self.seed).choice(n, self.max_train_images, replace=False).tolist())
        batches = iterate_batches(Picked(dataset, keep), self.batch_size, desc="loading alignment images")
        return torch.cat([(b["image"] * 255).round().to(torch.uint8) for b in batches])

    def _map_rows(self, images: torch.Tensor, fn: Any) -> torch.Tensor:
        """``fn`` over uint8 ``images`` in batches, without gradients, on the CPU."""
        with torch.no_grad():
            parts = [
                fn(images[i : i + self.batch_size].to(self.device).float() / 255).cpu()
                for i in range(0, len(images), self.batch_size)
            ]
        return torch.cat(parts)

    def _fit(self, dataset: ImageDataset) -> None:
        images = self._training_images(dataset)
        if len(images) < 2:
            raise DefectscopeError(f"FYD needs at least 2 fitting images, got {len(images)}")
        torch.manual_seed(self.seed)
        self._image_aligner, self._feature_aligners = aligner, feature_aligners = self._build()
        thumbs = self._map_rows(images, aligner.thumbnail)
        aligner.template.copy_(thumbs.mean(0, keepdim=True).to(self.device))
        self._train_image_alignment(aligner, _Rows(thumbs))
        aligner.eval()
        self._fine_info = {"alignment_images": len(images)}
        if self.fine_epochs > 0:
            firsts = self._map_rows(images, lambda x: self._first_stage(aligner(x)[0]).float())
            self._train_fine_alignment(feature_aligners, _Rows(firsts))
        feature_aligners.eval()
        if self.select_alignment:
            self._fine_info["held_out_nll"] = self._select_alignment(images)
        super()._fit(dataset)

    def _select_alignment(self, images: torch.Tensor) -> dict[str, float]:
        """Keep the alignment only where it makes held-out good images clearly more likely.

        A seeded quarter of the alignment images is held out; per-position Gaussians are fitted on the
        rest without alignment and with the image level, and the mean negative log-likelihood of the
        held-out features is computed under each. The feature level is off in both: a bilinear warp of
        feature maps smooths them, which raises their likelihood whatever the alignment is worth. Both
        levels are kept when the image level lowers that figure by at least ``min_gain`` of it; else
        both are switched off (their last layers zeroed: the identity) and FYD scores as PaDiM does.
        """
        order = np.random.default_rng([self.seed, 1]).permutation(len(images))
        n_held = max(2, len(images) // 4)
        if len(images) - n_held < 2:
            return {}
        held, rest = images[order[:n_held]], images[order[n_held:]]
        trained = [m.state_dict() for m in (self.image_aligner, self.feature_aligners)]
        trained = [{k: v.clone() for k, v in state.items()} for state in trained]
        nll: dict[str, float] = {}
        for mode in ("none", "image"):
            self._use_levels(trained, mode)
            nll[mode] = self._held_out_nll(rest, held)
        kept = "both" if nll["none"] - nll["image"] >= self.min_gain * abs(nll["none"]) else "none"
        self._use_levels(trained, kept)
        self._fine_info["kept"] = kept
        return {k: round(v, 4) for k, v in nll.items()}

    def _use_levels(self, trained: list[dict[str, torch.Tensor]], mode: str) -> None:
        """The trained aligners, with the levels that ``mode`` (none, image, both) leaves out switched off."""
        self.image_aligner.load_state_dict(trained[0])
        self.feature_aligners.load_state_dict(trained[1])
        if mode == "none":
            switch_off(self.image_aligner)
        if mode != "both":
            for aligner in self.feature_aligners:
                switch_off(aligner)

    def _held_out_nll(self, rest: torch.Tensor, held: torch.Tensor) -> float:
        """Mean negative log-likelihood (without the constant) of the features of ``held`` under the
        per-position Gaussians of ``rest`` (uint8 images), with the current alignment."""
        gaussian = StreamingGaussian()
        for chunk in rest.split(self.batch_size):
            gaussian.update(self._embedding(chunk).flatten(2).transpose(1, 2))
        mean, whitener = gaussian.mean().float(), gaussian.whitener(self.eps)
        emb = torch.cat([self._embedding(chunk) for chunk in held.split(self.batch_size)])
        dist = mahalanobis(emb.flatten(2).transpose(1, 2), mean, whitener)
        log_det = -2 * whitener.diagonal(dim1=1, dim2=2).log().sum(1)
        return float(0.5 * dist.pow(2).mean() + 0.5 * log_det.mean())

    def _embedding(self, images: torch.Tensor) -> torch.Tensor:
        """PaDiM's embedding (B, d, h, w) of uint8 ``images`` under the current alignment."""
        emb = patch_embedding(self.features(images.float() / 255), self.neighbourhood)
        return emb[:, self._select_channels(emb.shape[1])]

    def _pose_loss(self, theta: torch.Tensor, ranges: Ranges) -> torch.Tensor:
        """``anchor_weight`` times the squared batch mean of the maps' (angle, log scale, shift), zero when the
        average pose is the identity, plus ``prior_weight`` times their mean square relative to the ranges."""
        p = pose(theta)
        prior = (p / ranges.limits().to(p).clamp_min(1e-6)).pow(2).sum(1).mean()
        return self.anchor_weight * p.mean(0).pow(2).sum() + self.prior_weight * prior

    def _train_image_alignment(self, aligner: ImageAligner, thumbs: _Rows) -> None:
        optimizer = torch.optim.Adam(aligner.parameters(), lr=self.lr)
        ranges = self.ranges

        def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            x = batch["x"].to(self.device)
            shake = random_affine(len(x), ranges).to(self.device)
            theta = compose(shake, aligner.transform(warp(x, shake)))
            aligned = warp(x, theta)
            template = aligner.template.clone()
            agreement = (aligned - template).pow(2).mean()
            pose_loss = self._pose_loss(theta, ranges)
            with torch.no_grad():
                aligner.template.lerp_(aligned.mean(0, keepdim=True), 1 - TEMPLATE_MOMENTUM)
            return {"loss": agreement + pose_loss, "agreement": agreement, "pose": pose_loss}

        self.train(
            {"image_aligner": aligner},
            optimizer,
            lambda epoch: shuffled_batches(thumbs, self.batch_size, seed=self.seed, epoch=epoch),
            step,
            desc="training fyd image alignment",
        )

    def _train_fine_alignment(self, feature_aligners: nn.ModuleList, firsts: _Rows) -> None:
        by_layer = dict(zip(self.layers, self.extractor.channels))
        heads = [SiameseHead(by_layer[name], self.proj_dim).to(self.device) for name in self.layers]
        modules: dict[str, nn.Module] = {"feature_aligners": feature_aligners, "heads": nn.ModuleList(heads)}
        params = [p for m in modules.values() for p in m.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        ranges = self.ranges.scaled(self.feature_range)

        def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            first = batch["x"].to(self.device).contiguous(memory_format=torch.channels_last)
            shake = random_affine(len(first), ranges).to(self.device)
            features, theta = self._aligned_stages(first, shake)
            similarity = torch.stack([head.loss(f) for head, f in zip(heads, features)]).mean()
            pose_loss = self._pose_loss(theta, ranges)
            return {"loss": similarity + pose_loss, "similarity": similarity, "pose": pose_loss}

        budget = self.time_budget
        if budget is not None and self.training_log is not None:
            budget = max(budget - self.training_log.seconds, 0.1 * budget)
        trainer = self.trainer(
            modules,
            optimizer,
            epochs=self.fine_epochs,
            time_budget=budget,
            stage="fine alignment",
            desc="training fyd fine alignment",
        )
        log = trainer.run(lambda epoch: shuffled_batches(firsts, self.batch_size, seed=self.seed, epoch=epoch), step)
        self._fine_info |= {
            "fine_epochs_done": log.epochs_done,
            "fine_stopped_by": log.stopped_by,
            "fine_seconds": round(log.seconds, 3),
            "fine_final_loss": log.epoch_losses[-1] if log.epoch_losses else None,
        }

    def _fit_details(self) -> dict[str, Any]:
        return super()._fit_details() | {"alignment": self._fine_info}

    def fit_notes(self) -> list[str]:
        info = self.fit_info.get("alignment", {})
        nll = info.get("held_out_nll")
        if not nll:
            return []
        figures = f"held-out negative log-likelihood {nll['none']:.1f} unaligned, {nll['image']:.1f} aligned"
        if info.get("kept") == "both":
            return [f"alignment kept: {figures}"]
        return [
            f"alignment switched off, FYD scores as PaDiM does: {figures}, a gain under min_gain={self.min_gain} "
            "(the parts already sit in the same place, or their texture has no pose to align)"
        ]

    # -- scoring ---------------------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        features, theta = self.align(images)
        emb = patch_embedding(features, self.neighbourhood)[:, self.channels]
        b, _, h, w = emb.shape
        dist = mahalanobis(emb.flatten(2).transpose(1, 2), self.mean, self.whitener)
        aligned_maps = anomaly_maps(dist.reshape(b, h, w), images.shape[-2:], self.blur_sigma)
        maps = warp(aligned_maps[:, None], invert(theta))[:, 0]
        return Prediction(maps.flatten(1).amax(1), maps)

    # -- saving ----------------------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module | None]:
        return super()._modules() | {"image_aligner": self._image_aligner, "feature_aligners": self._feature_aligners}

    def _state(self) -> dict[str, torch.Tensor]:
        return (
            super()._state()
            | with_prefix("image_aligner", self.image_aligner)
            | with_prefix("feature_aligners", self.feature_aligners)
        )

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        image, features = self._build()
        image.load_state_dict(under_prefix(tensors, "image_aligner"))
        features.load_state_dict(under_prefix(tensors, "feature_aligners"))
        super()._load_state({k: tensors[k] for k in ("channels", "mean", "whitener")})
        self._image_aligner, self._feature_aligners = image.eval(), features.eval()
