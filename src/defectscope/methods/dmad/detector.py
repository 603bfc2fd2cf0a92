"""The DMAD detector: fitting orchestration, the scorer's training set and training, prediction, state."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ...data import ImageDataset
from ...errors import DefectscopeError
from ...nn.embedding import patch_embedding
from ...nn.exact_knn import knn
from ...nn.grouped_knn import nearest_excluding_groups
from ...nn.knn import Neighbours
from ...nn.state import under_prefix, with_prefix
from ...postprocess import anomaly_maps
from ...thresholds import DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, DEFAULT_TARGET_RECALL, ThresholdRule
from ..backbone_detector import BackboneDetector
from ..base import Prediction, fitted
from ..params import base_params, check_at_least, check_between
from ..trained import TrainedDetector
from .banks import NO_GROUP, BankBuilder, Banks
from .scorer import Scorer, knowledge


class TrainingSet(NamedTuple):
    """The scorer's training patches."""

    x: torch.Tensor  # (N, in_dim) standardised representations
    y: torch.Tensor  # (N,) 1.0 for anomalous patches
    from_labelled: torch.Tensor  # (N,) bool: the patch comes from a labelled defect
    counts: dict[str, int]  # patches by kind, for fit_info


class FusedAnomalies(NamedTuple):
    """Pseudo-anomalous patches made by feature fusion."""

    features: torch.Tensor  # (F, D)
    groups: torch.Tensor  # (F, 2) leave-one-out groups: the normal patch's image, the anomalous patch's source
    labelled: torch.Tensor  # (F,) bool: the anomalous side comes from a labelled defect
    category: np.ndarray  # (F,) category names


class DMAD(TrainedDetector, BackboneDetector):
    """Dual-memory-bank detector: normal + anomaly bank knowledge, MLP patch scorer."""

    name = "dmad"
    uses_labelled_defects = True
    export_unsupported = None
    fits_on_tiles = False  # its banks keep one group of patches per training image

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: tuple[str, ...] = ("s8", "s16"),
        weights: str | None = None,
        image_size: int = 256,
        neighbourhood: int = 3,
        coreset_ratio: float = 0.1,
        projection_dim: int = 64,
        max_patches: int = 300_000,
        synthetic_images: int = 200,
        anomaly_bank_size: int = 2048,
        defect_views: int = 8,
        croppaste_images: int = 8,
        num_neighbors: int = 4,
        hidden: tuple[int, ...] = (256, 64),
        max_train_patches: int = 20_000,
        labelled_share: float = 0.5,
        fused_share: float = 1.0,
        visible_quantile: float = 0.9,
        correction_bound: float = 2.0,
        epochs: int = 20,
        lr: float = 1e-3,
        patch_batch: int = 1024,
        time_budget: float | None = None,
        blur_sigma: float = 4.0,
        batch_size: int = 16,
        calibration_fraction: float = 0.1,
        threshold_rule: ThresholdRule = DEFAULT_RULE,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        false_alarm_confidence: float | None = None,
        target_recall: float = DEFAULT_TARGET_RECALL,
        threshold_sigmas: float = 3.0,
        seed: int = 0,
    ) -> None:
        super().__init__(**base_params(DMAD, locals()))
        if not 0.0 < coreset_ratio <= 1.0:
            raise DefectscopeError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        check_at_least(
            1,
            num_neighbors=num_neighbors,
            max_patches=max_patches,
            synthetic_images=synthetic_images,
            anomaly_bank_size=anomaly_bank_size,
            max_train_patches=max_train_patches,
            patch_batch=patch_batch,
            projection_dim=projection_dim,
        )
        check_at_least(1, **{f"hidden[{i}]": size for i, size in enumerate(hidden)})
        check_at_least(
            0,
            defect_views=defect_views,
            croppaste_images=croppaste_images,
            fused_share=fused_share,
            correction_bound=correction_bound,
        )
        check_between(0.0, 1.0, labelled_share=labelled_share, visible_quantile=visible_quantile)
        self.neighbourhood = neighbourhood
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.max_patches = max_patches
        self.synthetic_images = synthetic_images
        self.anomaly_bank_size = anomaly_bank_size
        self.defect_views = defect_views
        self.croppaste_images = croppaste_images
        self.num_neighbors = num_neighbors
        self.hidden = tuple(hidden)
        self.max_train_patches = max_train_patches
        self.labelled_share = labelled_share
        self.fused_share = fused_share
        self.visible_quantile = visible_quantile
        self.correction_bound = correction_bound
        self.patch_batch = patch_batch
        self.blur_sigma = blur_sigma
        self._normal: torch.Tensor | None = None  # (N, D) normal bank
        self._anomaly: torch.Tensor | None = None  # (M, D) anomaly bank
        self._scorer: Scorer | None = None
        self._scale = 1.0
        self._input_mean = torch.empty(0)
        self._input_std = torch.empty(0)
        self._n_labelled_bank = 0
        self._details: dict[str, Any] = {}

    # -- features --------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, D, h, w) of images (B, 3, H, W)."""
        return patch_embedding(self.features(images), self.neighbourhood)

    def _scorer_for(self, in_dim: int) -> Scorer:
        return Scorer.for_representation(in_dim, self.num_neighbors, self.hidden, self.correction_bound)

    # -- fitting ---------------------------------------------------------------------------------
    def _fit(self, dataset: ImageDataset) -> None:
        rng = np.random.default_rng([self.seed, 17])
        banks = BankBuilder(self, dataset).build(rng)
        self._scale, self._n_labelled_bank = banks.scale, banks.n_labelled
        training = self._training_set(banks, rng)
        self._normal, self._anomaly = banks.normal.float().contiguous(), banks.anomaly.float().contiguous()
        self._train_scorer(training)
        self._details = {
            "normal_bank_size": len(banks.normal),
            "anomaly_bank_size": len(banks.anomaly),
            "anomaly_bank_labelled": banks.n_labelled,
            "training_patches": training.counts,
            "distance_scale": round(self._scale, 6),
            "labelled_defects_unused": banks.unused_defects,
        }

    def _training_set(self, banks: Banks, rng: np.random.Generator) -> TrainingSet:
        """Leave-one-out representations of the training patches, capped per category and label
        (patches from labelled defects are all kept), plus fused pseudo-anomalies; synthetic and
        fused anomalous patches no farther from the normal bank than their category's bar are left out."""
        queries = banks.queries
        labels, labelled = queries["labels"], queries["labelled"]
        category = queries.categories()
        kept_parts = []
        for c in banks.categories:
            for label in (False, True):
                members = np.flatnonzero((category == c) & (labels.numpy() == label) & ~labelled.numpy())
                kept_parts.append(rng.permutation(members)[: self.max_train_patches])
        kept_parts.append(np.flatnonzero(labelled.numpy()))
        keep = torch.from_numpy(np.sort(np.concatenate(kept_parts)))
        features, groups = queries["features"][keep], queries["groups"][keep]
        labels, labelled, category = labels[keep], labelled[keep], category[keep.numpy()]
        fused = self._fused_anomalies(features, groups, labels, labelled, category, rng)
        n_fused_drawn = len(fused.features)
        features, groups = torch.cat([features, fused.features]), torch.cat([groups, fused.groups])
        labels = torch.cat([labels, torch.ones(n_fused_drawn, dtype=torch.bool)])
        labelled = torch.cat([labelled, fused.labelled])
        category = np.concatenate([category, fused.category])
        k = self.num_neighbors
        normal = nearest_excluding_groups(features, banks.normal, k, groups, banks.normal_groups)
        pseudo = (labels & ~labelled) | (torch.arange(len(labels)) >= len(labels) - n_fused_drawn)
        use = ~pseudo | (normal.distances[:, 0] > torch.tensor([banks.bars[c] for c in category]))
        features, groups, labels, labelled = features[use], groups[use], labels[use], labelled[use]
        normal = Neighbours(normal.distances[use], normal.indices[use])
        n_fused = int(use[len(use) - n_fused_drawn :].sum())
        try:
            anomaly = nearest_excluding_groups(features, banks.anomaly, k, groups, banks.anomaly_groups)
        except ValueError:
            raise DefectscopeError(
                f"dmad: its anomaly bank holds {len(banks.anomaly)} patches from too few images to give every "
                f"training patch {k} neighbours from other images; fit on more good images or raise "
                "synthetic_images or anomaly_bank_size"
            ) from None
        x = knowledge(features, banks.normal, normal, banks.anomaly, anomaly, self._scale)
        self._input_mean = x.mean(0)
        self._input_std = x.std(0).clamp_min(1e-6)
        real = slice(0, len(labels) - n_fused)
        counts = {
            "normal": int((~labels).sum()),
            "anomalous": int(labels.sum()) - n_fused,
            "fused": n_fused,
            "labelled_anomalous": int((labels[real] & labelled[real]).sum()),
        }
        return TrainingSet((x - self._input_mean) / self._input_std, labels.float(), labelled, counts)

    def _fused_anomalies(
        self,
        features: torch.Tensor,
        groups: torch.Tensor,
        labels: torch.Tensor,
        labelled: torch.Tensor,
        category: np.ndarray,
        rng: np.random.Generator,
    ) -> FusedAnomalies:
        """Pseudo-anomalous features by feature fusion: a normal patch feature moved a random part
        (lambda in [0.2, 1]) of the way to an anomalous one of the same category, ``fused_share``
        times as many as there are anomalous patches. They fill the space between normal and
        anomalous features, so the scorer ranks patches by how far they leave the normal ones."""
        parts: list[FusedAnomalies] = []
        plain = (groups[:, 1] == NO_GROUP).numpy()
        for c in np.unique(category):
            normal = np.flatnonzero((category == c) & ~labels.numpy() & plain & ~labelled.numpy())
            anomalous = np.flatnonzero((category == c) & labels.numpy())
            n = round(self.fused_share * len(anomalous))
            if n == 0 or len(normal) == 0:
                continue
            a, b = torch.from_numpy(rng.choice(normal, n)), torch.from_numpy(rng.choice(anomalous, n))
            lam = torch.from_numpy(rng.uniform(0.2, 1.0, n)).float()[:, None]
            source = torch.where(groups[b, 1] != NO_GROUP, groups[b, 1], groups[b, 0])
            parts.append(
                FusedAnomalies(
                    (1 - lam) * features[a] + lam * features[b],
                    torch.stack([groups[a, 0], source], 1),
                    labelled[b],
                    np.full(n, c),
                )
            )
        if not parts:
            return FusedAnomalies(
                torch.empty(0, features.shape[1]),
                torch.empty(0, 2, dtype=torch.long),
                torch.empty(0, dtype=torch.bool),
                np.empty(0, dtype=category.dtype),
            )
        return FusedAnomalies(
            torch.cat([p.features for p in parts]),
            torch.cat([p.groups for p in parts]),
            torch.cat([p.labelled for p in parts]),
            np.concatenate([p.category for p in parts]),
        )

    def _train_scorer(self, training: TrainingSet) -> None:
        x, y, from_labelled = training.x, training.y, training.from_labelled
        scorer = self._scorer_for(x.shape[1]).to(self.device)
        self._scorer = scorer
        optimizer = torch.optim.AdamW(scorer.parameters(), lr=self.lr, weight_decay=1e-4)
        normal = np.flatnonzero(~y.bool().numpy())
        anomalous = np.flatnonzero(y.bool().numpy())
        # anomalous draws: labelled-defect patches make up ``labelled_share`` of them when there are any
        synthetic_part = ~from_labelled.numpy()[anomalous]
        weights = np.where(synthetic_part, 1.0 - self.labelled_share, self.labelled_share)
        if synthetic_part.all() or not synthetic_part.any():
            weights = np.ones(len(anomalous))
        weights = weights / np.where(synthetic_part, synthetic_part.sum(), (~synthetic_part).sum()).clip(min=1)
        weights = weights / weights.sum()
        half = max(1, self.patch_batch // 2)
        x, y = x.to(self.device), y.to(self.device)

        def batches(epoch: int) -> list[torch.Tensor]:
            gen = np.random.default_rng([self.seed, epoch, 29])
            order = gen.permutation(normal)
            n_steps = max(1, len(order) // half)
            drawn = gen.choice(anomalous, size=n_steps * half, p=weights)
            return [
                torch.from_numpy(np.concatenate([order[s * half : (s + 1) * half], drawn[s * half : (s + 1) * half]]))
                for s in range(n_steps)
            ]

        def step(index: torch.Tensor) -> torch.Tensor:
            index = index.to(self.device)
            return F.binary_cross_entropy_with_logits(scorer(x[index]), y[index])

        self.train({"scorer": scorer}, optimizer, batches, step, desc="training dmad scorer")

    def _fit_details(self) -> dict[str, Any]:
        return {**super()._fit_details(), **self._details}

    # -- prediction ------------------------------------------------------------------------------
    def patch_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Patch anomaly logits (B, h, w) for images (B, 3, H, W)."""
        emb = self.embed(images)
        b, d, h, w = emb.shape
        queries = emb.permute(0, 2, 3, 1).reshape(-1, d)
        normal, anomaly = self.normal_bank, self.anomaly_bank
        k = self.num_neighbors
        x = knowledge(queries, normal, knn(queries, normal, k), anomaly, knn(queries, anomaly, k), self._scale)
        x = ((x - self._input_mean) / self._input_std).to(self.device)
        return fitted(self, self._scorer)(x).float().cpu().reshape(b, h, w)

    def _predict(self, images: torch.Tensor) -> Prediction:
        maps = anomaly_maps(self.patch_logits(images), images.shape[-2:], self.blur_sigma)
        return Prediction(maps.flatten(1).amax(1), maps)

    def _modules(self) -> dict[str, torch.nn.Module | None]:
        return super()._modules() | {"scorer": self._scorer}

    # -- state -----------------------------------------------------------------------------------
    @property
    def normal_bank(self) -> torch.Tensor:
        return fitted(self, self._normal)

    @property
    def anomaly_bank(self) -> torch.Tensor:
        return fitted(self, self._anomaly)

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            "normal_bank": self.normal_bank,
            "anomaly_bank": self.anomaly_bank,
            "anomaly_bank_labelled": torch.tensor([self._n_labelled_bank]),
            "distance_scale": torch.tensor([self._scale]),
            "input_mean": self._input_mean,
            "input_std": self._input_std,
            **with_prefix("scorer", fitted(self, self._scorer)),
        }

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        normal, anomaly = tensors["normal_bank"], tensors["anomaly_bank"]
        if normal.ndim != 2 or anomaly.ndim != 2 or normal.shape[1] != anomaly.shape[1]:
            raise ValueError(
                f"banks must be 2-D with equal widths, got {tuple(normal.shape)} and {tuple(anomaly.shape)}"
            )
        in_dim = 3 * normal.shape[1] + 2 * self.num_neighbors
        if tensors["input_mean"].shape != (in_dim,) or tensors["input_std"].shape != (in_dim,):
            raise ValueError(f"input statistics must have {in_dim} entries")
        scorer = self._scorer_for(in_dim)
        scorer.load_state_dict(under_prefix(tensors, "scorer"))
        scorer.eval()
        self._scorer = scorer.to(self.device)
        self._normal, self._anomaly = normal.float().contiguous(), anomaly.float().contiguous()
        self._n_labelled_bank = int(tensors["anomaly_bank_labelled"][0])
        self._scale = float(tensors["distance_scale"][0])
        self._input_mean, self._input_std = tensors["input_mean"].float(), tensors["input_std"].float()
