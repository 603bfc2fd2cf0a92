"""DMAD (Hu et al., "DMAD: Dual Memory Bank for Real-World Anomaly Detection", arXiv 2403.12362).

One model for one or many categories, from good images alone or with a few labelled defects:

* patch features as in PatchCore (locally averaged s8 + s16 backbone maps);
* a **normal bank**: greedy coreset of good-patch features;
* an **anomaly bank**: features of the anomalous patches of synthetic anomalies (Perlin-noise
  textures and CutPaste on the training images; kept grey on grey parts), plus, when labelled
  defects are given, the features of their defect regions, gathered with *anomaly-centred
  sampling* (extra crops centred on the defect, flipped and turned, and the defect pasted onto
  good images) so that a handful of defects still yields enough anomalous patches;
* for every patch, the **enhanced representation**: the feature, its distances to its k nearest
  entries of each bank and, per bank, the feature minus a cross-attention read-out of those
  neighbours (softmax over their negative squared, scaled distances);
* an **MLP** maps the representation to a patch score (logit), trained with binary
  cross-entropy, normal and anomalous patches balanced in every batch. Anomalous training
  patches: synthetic ones, labelled ones, and pseudo-anomalies by *feature fusion* (normal
  features moved part of the way toward anomalous ones).

Two choices go beyond the paper, both measured on mtd (figures in BENCHMARKS.md): a synthetic anomaly
whose patch is no farther from the normal bank than 90 % of normal patches (its category's
``visible_quantile``) is not used (the image changed, its features did not: a wrong label); and
the MLP output is a bounded correction (``correction_bound`` logits) to a score anchored on the
nearest-normal distance, so that defects unlike any (pseudo-)anomaly still score high.

Training patches come from the same images as the banks, so each training patch is matched
leave-one-out: bank entries from its own image (or defect) are skipped, so it sees the banks as
a test image does (:mod:`defectscope.nn.grouped_knn`). Budgets (pooled patches, synthetic
images, bank and training-patch counts) are per category, so a unified model over C categories
gets C times the budget of one and every category is represented as in its own model.

Anomaly map: patch logits upsampled and smoothed (:func:`~defectscope.postprocess.anomaly_maps`);
image score: the map's maximum.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageDataset, Sample, iterate_batches
from ..data.synth import CropPaste, CutPaste, PerlinTexture, SynthDataset
from ..errors import DefectscopeError
from ..nn.coreset import greedy_coreset
from ..nn.embedding import patch_embedding
from ..nn.grouped_knn import nearest_excluding_groups
from ..nn.knn import NearestNeighbors
from ..postprocess import anomaly_maps
from .backbone_detector import BackboneDetector
from .base import fitted
from .trained import TrainedDetector

NO_GROUP = -1


def knowledge(queries: torch.Tensor, normal_bank: torch.Tensor, normal: tuple[torch.Tensor, torch.Tensor],
              anomaly_bank: torch.Tensor, anomaly: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """Enhanced representation (Q, 3 D + 2 k) of queries (Q, D) from their neighbours in both banks.

    ``normal`` and ``anomaly`` are (distances (Q, k), indices (Q, k)) into the banks. Per bank:
    the distances divided by ``scale`` and the query minus the attention-weighted mean of the
    neighbours (weights: softmax of minus the squared scaled distances).
    """
    parts = [queries]
    for bank, (dist, index) in ((normal_bank, normal), (anomaly_bank, anomaly)):
        scaled = dist / scale
        weights = torch.softmax(-scaled * scaled, dim=1)
        readout = torch.einsum("qk,qkd->qd", weights, bank[index])
        parts += [queries - readout, scaled]
    return torch.cat(parts, dim=1)


def patch_fractions(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Share (B, h, w) of every patch cell covered by the (B, H, W) masks."""
    return F.adaptive_avg_pool2d(masks[:, None].float(), size)[:, 0]


def anomalous_cells(fraction: torch.Tensor) -> torch.Tensor:
    """Cells counted as anomalous: covered at least half, or half as much as the image's most covered
    cell when the defect is smaller than one cell (so tiny defects still give a patch)."""
    top = fraction.amax()
    if top <= 0:
        return torch.zeros_like(fraction, dtype=torch.bool)
    return fraction >= min(0.5, 0.5 * float(top))


class _AnyOf:
    """Synthesiser that applies one of several, chosen at random, keeping grey images grey.

    Colour changes on a grey part (e.g. magnetic tiles) are a cue no real defect of that part
    has, and a scorer trained on them learns to look for colour; so on an image whose channels
    are equal the result is turned back to grey and the mask reduced to the pixels still changed.
    """

    kind = "mixture"

    def __init__(self, *synthesizers: Any) -> None:
        self.synthesizers = synthesizers

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        result, mask = self.synthesizers[int(rng.integers(len(self.synthesizers)))](image, rng)
        if (image - image.mean(0)).abs().amax() < 2.0 / 255.0:
            result = result.mean(0, keepdim=True).expand_as(result).clone()
            mask = mask * ((result - image).abs().amax(0) >= 1.0 / 255.0)
            result = torch.where(mask.bool()[None], result, image)
        return result, mask


class _Patches:
    """Patch features gathered during fitting, with their labels and leave-one-out groups."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Any]] = {}  # tensors, and lists of category names

    def add(self, **columns: torch.Tensor | list[str]) -> None:
        for name, value in columns.items():
            self.parts.setdefault(name, []).append(value)

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.cat(self.parts[name]) if name in self.parts else torch.empty(0)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts.get("features", []))


class _Scorer(torch.nn.Module):
    """Patch logit = w * (standardised nearest-normal distance) + b + bound * tanh(MLP(representation)).

    The MLP reads the whole enhanced representation but can move the logit by at most
    ``bound`` away from the distance-based score it is anchored to, so a patch far from every
    normal patch stays anomalous even when it resembles no (pseudo-)anomaly seen in training.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], anchor: int, bound: float) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
            width = size
        layers.append(torch.nn.Linear(width, 1))
        self.mlp = torch.nn.Sequential(*layers)
        self.weight = torch.nn.Parameter(torch.tensor(1.0))
        self.bias = torch.nn.Parameter(torch.tensor(0.0))
        self.anchor, self.bound = anchor, bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N,) for standardised representations (N, in_dim)."""
        return self.weight.abs() * x[:, self.anchor] + self.bias + self.bound * torch.tanh(self.mlp(x)[:, 0])


class DMAD(TrainedDetector, BackboneDetector):
    """Dual-memory-bank detector: normal + anomaly bank knowledge, MLP patch scorer."""

    name = "dmad"
    uses_labelled_defects = True

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
        threshold_sigmas: float = 3.0,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone=backbone, layers=layers, weights=weights, epochs=epochs, lr=lr,
                         time_budget=time_budget, image_size=image_size, batch_size=batch_size,
                         calibration_fraction=calibration_fraction, threshold_sigmas=threshold_sigmas, seed=seed)
        if not 0.0 < coreset_ratio <= 1.0:
            raise DefectscopeError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if num_neighbors < 1:
            raise DefectscopeError(f"num_neighbors must be at least 1, got {num_neighbors}")
        if not 0.0 <= labelled_share <= 1.0:
            raise DefectscopeError(f"labelled_share must be in [0, 1], got {labelled_share}")
        for name, value in (("max_patches", max_patches), ("synthetic_images", synthetic_images),
                            ("anomaly_bank_size", anomaly_bank_size), ("max_train_patches", max_train_patches),
                            ("patch_batch", patch_batch)):
            if value < 1:
                raise DefectscopeError(f"{name} must be at least 1, got {value}")
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
        self._normal: NearestNeighbors | None = None
        self._anomaly: NearestNeighbors | None = None
        self._scorer: _Scorer | None = None
        self._scale = 1.0
        self._input_mean = torch.empty(0)
        self._input_std = torch.empty(0)
        self._n_labelled_bank = 0
        self._details: dict[str, Any] = {}

    # -- features --------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, D, h, w) of images (B, 3, H, W)."""
        return patch_embedding(self.features(images), self.neighbourhood)

    def _scorer_for(self, in_dim: int) -> _Scorer:
        feature_dim = (in_dim - 2 * self.num_neighbors) // 3
        # knowledge() lays out [feature, feature - normal read-out, normal distances, ...]
        return _Scorer(in_dim, self.hidden, anchor=2 * feature_dim, bound=self.correction_bound)

    # -- fitting ---------------------------------------------------------------------------------
    def _fit(self, dataset: ImageDataset) -> None:
        samples = dataset.samples
        categories = sorted({s.category for s in samples})
        rng = np.random.default_rng([self.seed, 17])
        queries, anomalies, labelled = _Patches(), _Patches(), _Patches()
        pool = self._good_patches(dataset, categories, queries, rng)
        self._synthetic_patches(samples, categories, anomalies, queries, rng)
        unused = self._add_labelled(samples, labelled, queries, rng)

        features = pool["features"]
        owners = np.array(categories)[pool["category"].numpy()]
        keep = self._coreset_per_category(features, owners, lambda n: max(self.num_neighbors + 1,
                                                                          round(n * self.coreset_ratio)),
                                          "normal bank coreset")
        normal_bank, normal_groups = features[keep].contiguous(), pool["groups"][keep]
        del pool, features
        # a generator of its own, so labelled defects do not change which synthetic anomalies count
        bars = self._visibility_bars(queries, categories, normal_bank, normal_groups,
                                     np.random.default_rng([self.seed, 23]))
        anomaly_bank, anomaly_groups = self._anomaly_bank(samples, categories, anomalies, labelled, bars,
                                                          normal_bank, normal_groups)

        x, y, from_labelled, counts = self._training_set(queries, categories, normal_bank, normal_groups,
                                                         anomaly_bank, anomaly_groups, bars, rng)
        self._normal = NearestNeighbors(normal_bank, exact=True)
        self._anomaly = NearestNeighbors(anomaly_bank, exact=True)
        self._train_scorer(x, y, from_labelled)
        self._details = {"normal_bank_size": len(normal_bank), "anomaly_bank_size": len(anomaly_bank),
                         "anomaly_bank_labelled": self._n_labelled_bank, "training_patches": counts,
                         "distance_scale": round(self._scale, 6), "labelled_defects_unused": unused}

    def _good_patches(self, dataset: ImageDataset, categories: list[str], queries: _Patches,
                      rng: np.random.Generator) -> _Patches:
        """The normal pool (at most ``max_patches`` random patches per category) and normal training patches."""
        samples = dataset.samples
        per_category = {c: sum(s.category == c for s in samples) for c in categories}
        pool = _Patches()
        index = 0
        for batch in iterate_batches(dataset, self.batch_size, desc="extracting features"):
            emb = self.embed(batch["image"])
            for features in emb.permute(0, 2, 3, 1).reshape(emb.shape[0], -1, emb.shape[1]):
                n_images = per_category[samples[index].category]
                keep = rng.permutation(len(features))[: math.ceil(self.max_patches / n_images)]
                pool.add(features=features[keep], groups=torch.full((len(keep),), index),
                         category=torch.full((len(keep),), categories.index(samples[index].category)))
                ask = rng.permutation(len(features))[: math.ceil(self.max_train_patches / n_images)]
                self._add_queries(queries, features[ask], torch.zeros(len(ask), dtype=torch.bool),
                                  (index, NO_GROUP), samples[index].category, labelled=False)
                index += 1
        return pool

    def _synthetic_patches(self, samples: list[Sample], categories: list[str], anomalies: _Patches,
                           queries: _Patches, rng: np.random.Generator) -> None:
        """Patches of synthetic anomalies on up to ``synthetic_images`` training images per category."""
        chosen: list[int] = []
        for category in categories:
            members = [i for i, s in enumerate(samples) if s.category == category]
            chosen += sorted(rng.permutation(members)[: self.synthetic_images].tolist())
        synth = SynthDataset(ImageDataset([samples[i] for i in chosen], self.image_size),
                             _AnyOf(PerlinTexture(), CutPaste("patch"), CutPaste("scar")), seed=self.seed)
        done = 0
        for batch in iterate_batches(synth, self.batch_size, desc="synthetic anomalies"):
            ids = chosen[done:done + len(batch["path"])]
            self._add_anomalous_images(batch["synth_image"], batch["synth_mask"], [(i, NO_GROUP) for i in ids],
                                       [samples[i].category for i in ids], anomalies, queries, rng, labelled=False)
            done += len(ids)

    def _visibility_bars(self, queries: _Patches, categories: list[str], normal_bank: torch.Tensor,
                         normal_groups: torch.Tensor, rng: np.random.Generator) -> dict[str, float]:
        """Per category, the ``visible_quantile`` of the leave-one-out nearest-normal distances of normal
        patches: the bar a synthetic anomaly must clear to count (one that changed the image but not its
        features is no anomaly). Also sets the distance scale (their median over all categories)."""
        category = np.array([c for part in queries.parts["category"] for c in part])
        plain = np.flatnonzero(~queries["labels"].numpy() & ~queries["labelled"].numpy())
        plain = rng.permutation(plain)[: self.max_train_patches * len(categories)]
        reference = nearest_excluding_groups(queries["features"][plain], normal_bank, 1, queries["groups"][plain],
                                             normal_groups)[0][:, 0]
        self._scale = float(reference.median().clamp_min(1e-6))
        return {c: float(reference[torch.from_numpy(category[plain] == c)].quantile(self.visible_quantile))
                for c in categories}

    def _anomaly_bank(self, samples: list[Sample], categories: list[str], anomalies: _Patches, labelled: _Patches,
                      bars: dict[str, float], normal_bank: torch.Tensor,
                      normal_groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coresets of the visible synthetic anomalous patches and of the labelled-defect patches
        (at most ``anomaly_bank_size`` each per category), with their groups."""
        features, groups = anomalies["features"], anomalies["groups"]
        bar = torch.tensor([bars[samples[int(i)].category] for i in groups])
        visible = nearest_excluding_groups(features, normal_bank, 1, groups, normal_groups)[0][:, 0] > bar
        features, groups = features[visible], groups[visible]
        if len(features) < self.num_neighbors + 1:
            raise DefectscopeError(f"synthetic anomalies gave only {len(features)} anomalous patches; "
                                   "use larger images or more synthetic_images")
        owners = np.array([samples[int(i)].category for i in groups])
        keep = self._coreset_per_category(features, owners, lambda n: self.anomaly_bank_size, "anomaly bank coreset")
        real, real_groups = labelled["features"].reshape(-1, features.shape[1]), labelled["groups"].long()
        owners = np.array([self.labelled_defects[int(i) - len(samples)].category for i in real_groups], dtype=object)
        real_keep = self._coreset_per_category(real, owners, lambda n: self.anomaly_bank_size,
                                               "labelled anomaly coreset")
        self._n_labelled_bank = len(real_keep)
        return (torch.cat([features[keep], real[real_keep]]).contiguous(),
                torch.cat([groups[keep], real_groups[real_keep]]))

    def _coreset_per_category(self, features: torch.Tensor, owners: np.ndarray, size: Callable[[int], int],
                              desc: str) -> torch.Tensor:
        """Row indices of a coreset of each category's rows (``size(n)`` of its n rows), so that in a
        unified model every category keeps the bank it would have on its own."""
        chosen = [torch.empty(0, dtype=torch.long)]
        for category in sorted(set(owners.tolist())):
            rows = torch.from_numpy(np.flatnonzero(owners == category))
            chosen.append(rows[self._coreset(features[rows], size(len(rows)), desc)])
        return torch.cat(chosen)

    def _coreset(self, features: torch.Tensor, n_select: int, desc: str) -> torch.Tensor | slice:
        """Indices of a greedy coreset of ``n_select`` rows, or all rows when there are not more."""
        if n_select >= len(features):
            return slice(None)
        return greedy_coreset(features, n_select, projection_dim=self.projection_dim, seed=self.seed, desc=desc)

    def _add_queries(self, queries: _Patches, features: torch.Tensor, labels: torch.Tensor,
                     groups: tuple[int, int], category: str, labelled: bool) -> None:
        n = len(features)
        queries.add(features=features, labels=labels, groups=torch.tensor(groups).expand(n, 2),
                    labelled=torch.full((n,), labelled), category=[category] * n)

    def _add_anomalous_images(self, images: torch.Tensor, masks: torch.Tensor, groups: list[tuple[int, int]],
                              categories: list[str], bank: _Patches, queries: _Patches, rng: np.random.Generator,
                              labelled: bool, bank_group: list[int] | None = None) -> None:
        """Anomalous patches of ``images`` go to ``bank`` and to the training queries, together with as
        many (at least 32) untouched patches of the same images as normal queries."""
        emb = self.embed(images)
        fractions = patch_fractions(masks, emb.shape[-2:]).flatten(1)
        flat = emb.permute(0, 2, 3, 1).reshape(emb.shape[0], -1, emb.shape[1])
        for b, features in enumerate(flat):
            bad = anomalous_cells(fractions[b])
            if not bad.any():
                continue
            tag = groups[b][0] if bank_group is None else bank_group[b]
            bank.add(features=features[bad], groups=torch.full((int(bad.sum()),), tag))
            self._add_queries(queries, features[bad], torch.ones(int(bad.sum()), dtype=torch.bool), groups[b],
                              categories[b], labelled)
            clean = torch.nonzero(fractions[b] == 0)[:, 0]
            clean = clean[torch.from_numpy(rng.permutation(len(clean))[: max(32, int(bad.sum()))])]
            self._add_queries(queries, features[clean], torch.zeros(len(clean), dtype=torch.bool), groups[b],
                              categories[b], labelled)

    def _add_labelled(self, samples: list[Sample], bank: _Patches, queries: _Patches, rng: np.random.Generator) -> list[str]:
        """Features of the labelled defects (anomaly-centred views and Crop&Paste); returns the unusable ones."""
        if not self.labelled_defects:
            return []
        unused = []
        defects = ImageDataset(self.labelled_defects, self.image_size)
        for j in range(len(defects)):
            item = defects[j]
            image, mask = item["image"], item["mask"]
            if not mask.any():
                unused.append(item["path"])
                warnings.warn(f"{item['path']}: defect mask is empty at image size {self.image_size}; "
                              "this labelled defect is not used", stacklevel=2)
                continue
            group = len(samples) + j
            category = self.labelled_defects[j].category
            views = [(image, mask)] + [self._centred_view(image, mask, rng) for _ in range(self.defect_views)]
            images, masks = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
            for start in range(0, len(views), self.batch_size):
                stop = min(start + self.batch_size, len(views))
                self._add_anomalous_images(images[start:stop], masks[start:stop], [(group, NO_GROUP)] * (stop - start),
                                           [category] * (stop - start), bank, queries, rng, labelled=True)
            if self.croppaste_images:
                same = [i for i, s in enumerate(samples) if s.category == category] or list(range(len(samples)))
                hosts = [same[int(i)] for i in rng.integers(len(same), size=self.croppaste_images)]
                paste = CropPaste([(image, mask.float())])
                good = ImageDataset([samples[i] for i in hosts], self.image_size)
                pasted = [paste(good[n]["image"], np.random.default_rng([self.seed, group, n]))
                          for n in range(len(hosts))]
                self._add_anomalous_images(torch.stack([p[0] for p in pasted]), torch.stack([p[1] for p in pasted]),
                                           [(i, group) for i in hosts], [category] * len(hosts), bank, queries, rng,
                                           labelled=True, bank_group=[group] * len(hosts))
        return unused

    def _centred_view(self, image: torch.Tensor, mask: torch.Tensor,
                      rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A square crop (60-100 % of the side) centred on a random defect pixel, resized back, flipped
        and turned by a multiple of 90 degrees."""
        size = image.shape[-1]
        ys, xs = torch.nonzero(mask, as_tuple=True)
        pick = int(rng.integers(len(ys)))
        side = max(8, round(size * rng.uniform(0.6, 1.0)))
        top = int(np.clip(int(ys[pick]) - side // 2, 0, size - side))
        left = int(np.clip(int(xs[pick]) - side // 2, 0, size - side))
        crop = image[:, top:top + side, left:left + side]
        crop_mask = mask[top:top + side, left:left + side].float()
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        crop_mask = F.interpolate(crop_mask[None, None], size=(size, size), mode="nearest-exact")[0, 0]
        turns, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        if flip:
            crop, crop_mask = crop.flip(-1), crop_mask.flip(-1)
        return crop.rot90(turns, (-2, -1)), crop_mask.rot90(turns, (-2, -1)) > 0.5

    def _training_set(self, queries: _Patches, categories: list[str], normal_bank: torch.Tensor,
                      normal_groups: torch.Tensor, anomaly_bank: torch.Tensor, anomaly_groups: torch.Tensor,
                      bars: dict[str, float], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, int]]:
        """Leave-one-out representations of the training patches, capped per category and label
        (patches from labelled defects are all kept), plus fused pseudo-anomalies; synthetic and
        fused anomalous patches no farther from the normal bank than their category's bar are left out."""
        labels, labelled = queries["labels"], queries["labelled"]
        category = np.array([c for part in queries.parts["category"] for c in part])
        keep = []
        for c in categories:
            for label in (False, True):
                members = np.flatnonzero((category == c) & (labels.numpy() == label) & ~labelled.numpy())
                keep.append(rng.permutation(members)[: self.max_train_patches])
        keep.append(np.flatnonzero(labelled.numpy()))
        keep = torch.from_numpy(np.sort(np.concatenate(keep)))
        features, groups = queries["features"][keep], queries["groups"][keep]
        labels, labelled, category = labels[keep], labelled[keep], category[keep.numpy()]
        fused = self._fused_anomalies(features, groups, labels, labelled, category, rng)
        features, groups = torch.cat([features, fused[0]]), torch.cat([groups, fused[1]])
        labels = torch.cat([labels, torch.ones(len(fused[0]), dtype=torch.bool)])
        labelled = torch.cat([labelled, fused[2]])
        category = np.concatenate([category, fused[3]])
        k = self.num_neighbors
        normal = nearest_excluding_groups(features, normal_bank, k, groups, normal_groups)
        pseudo = (labels & ~labelled) | (torch.arange(len(labels)) >= len(labels) - len(fused[0]))
        use = ~pseudo | (normal[0][:, 0] > torch.tensor([bars[c] for c in category]))
        features, groups, labels, labelled = features[use], groups[use], labels[use], labelled[use]
        normal = (normal[0][use], normal[1][use])
        n_fused = int(use[len(use) - len(fused[0]):].sum())
        anomaly = nearest_excluding_groups(features, anomaly_bank, k, groups, anomaly_groups)
        x = knowledge(features, normal_bank, normal, anomaly_bank, anomaly, self._scale)
        self._input_mean = x.mean(0)
        self._input_std = x.std(0).clamp_min(1e-6)
        counts = {"normal": int((~labels).sum()), "anomalous": int(labels.sum()) - n_fused, "fused": n_fused,
                  "labelled_anomalous": int((labels[:len(labels) - n_fused] & labelled[:len(labels) - n_fused]).sum())}
        return (x - self._input_mean) / self._input_std, labels.float(), labelled, counts

    def _fused_anomalies(self, features: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor,
                         labelled: torch.Tensor, category: np.ndarray,
                         rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """Pseudo-anomalous features by feature fusion: a normal patch feature moved a random part
        (lambda in [0.2, 1]) of the way to an anomalous one of the same category, ``fused_share``
        times as many as there are anomalous patches. They fill the space between normal and
        anomalous features, so the scorer ranks patches by how far they leave the normal ones.
        Returns features, leave-one-out groups (both sources), from-labelled flags and categories."""
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
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
            parts.append(((1 - lam) * features[a] + lam * features[b], torch.stack([groups[a, 0], source], 1),
                          labelled[b], np.full(n, c)))
        if not parts:
            return (torch.empty(0, features.shape[1]), torch.empty(0, 2, dtype=torch.long),
                    torch.empty(0, dtype=torch.bool), np.empty(0, dtype=category.dtype))
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                np.concatenate([p[3] for p in parts]))

    def _train_scorer(self, x: torch.Tensor, y: torch.Tensor, from_labelled: torch.Tensor) -> None:
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
            return [torch.from_numpy(np.concatenate([order[s * half:(s + 1) * half], drawn[s * half:(s + 1) * half]]))
                    for s in range(n_steps)]

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
        normal, anomaly = fitted(self, self._normal), fitted(self, self._anomaly)
        k = self.num_neighbors
        x = knowledge(queries, normal.bank, normal.search(queries, k), anomaly.bank, anomaly.search(queries, k),
                      self._scale)
        x = ((x - self._input_mean) / self._input_std).to(self.device)
        return fitted(self, self._scorer)(x).float().cpu().reshape(b, h, w)

    def _predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = anomaly_maps(self.patch_logits(images), images.shape[-2:], self.blur_sigma)
        return maps.flatten(1).amax(1), maps

    def _to_device(self, device: torch.device) -> None:
        super()._to_device(device)
        if self._scorer is not None:
            self._scorer.to(device)

    # -- state -----------------------------------------------------------------------------------
    @property
    def normal_bank(self) -> torch.Tensor:
        return fitted(self, self._normal).bank

    @property
    def anomaly_bank(self) -> torch.Tensor:
        return fitted(self, self._anomaly).bank

    def _state(self) -> dict[str, torch.Tensor]:
        scorer = fitted(self, self._scorer)
        return {"normal_bank": self.normal_bank, "anomaly_bank": self.anomaly_bank,
                "anomaly_bank_labelled": torch.tensor([self._n_labelled_bank]),
                "distance_scale": torch.tensor([self._scale]), "input_mean": self._input_mean,
                "input_std": self._input_std, **{f"scorer.{k}": v for k, v in scorer.state_dict().items()}}

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        normal, anomaly = tensors["normal_bank"], tensors["anomaly_bank"]
        if normal.ndim != 2 or anomaly.ndim != 2 or normal.shape[1] != anomaly.shape[1]:
            raise ValueError(f"banks must be 2-D with equal widths, got {tuple(normal.shape)} and {tuple(anomaly.shape)}")
        in_dim = 3 * normal.shape[1] + 2 * self.num_neighbors
        if tensors["input_mean"].shape != (in_dim,) or tensors["input_std"].shape != (in_dim,):
            raise ValueError(f"input statistics must have {in_dim} entries")
        scorer = self._scorer_for(in_dim)
        scorer.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("scorer.")})
        scorer.eval()
        self._scorer = scorer.to(self.device)
        self._normal = NearestNeighbors(normal, exact=True)
        self._anomaly = NearestNeighbors(anomaly, exact=True)
        self._n_labelled_bank = int(tensors["anomaly_bank_labelled"][0])
        self._scale = float(tensors["distance_scale"][0])
        self._input_mean, self._input_std = tensors["input_mean"].float(), tensors["input_std"].float()
