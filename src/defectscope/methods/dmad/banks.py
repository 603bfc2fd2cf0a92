"""Building DMAD's two memory banks and the patches its scorer trains on.

:class:`BankBuilder` extracts the patch features of the fitting images (the normal pool and
normal training patches), of synthetic anomalies painted on them and of the labelled defects
(anomaly-centred views and Crop&Paste), then subsamples the normal bank and the anomaly bank by
coresets per category. Every patch carries leave-one-out groups: the image (or defect) it comes
from, and for pasted defects the defect as well, so that matching skips its own sources.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ...data import ImageDataset, iterate_batches
from ...data.synth import CropPaste, CutPaste, PerlinTexture, SynthDataset
from ...errors import DefectscopeError
from ...nn.coreset import greedy_coreset
from ...nn.grouped_knn import nearest_excluding_groups

if TYPE_CHECKING:
    from .detector import DMAD

NO_GROUP = -1  # the second leave-one-out group of a patch that has only one source


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


class GreyKeepingMixture:
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


class PatchTable:
    """Patch features gathered during fitting, column by column, with their labels and groups."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Any]] = {}  # tensors, and lists of category names

    def add(self, **columns: torch.Tensor | list[str]) -> None:
        for name, value in columns.items():
            self.parts.setdefault(name, []).append(value)

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.cat(self.parts[name]) if name in self.parts else torch.empty(0)

    def categories(self) -> np.ndarray:
        """The category name of every row."""
        return np.array([c for part in self.parts["category"] for c in part])

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts.get("features", []))


@dataclass
class Banks:
    """What :meth:`BankBuilder.build` gathers."""

    categories: list[str]  # sorted category names of the fitting images
    normal: torch.Tensor  # (N, D) normal bank
    normal_groups: torch.Tensor  # (N,) source image of every normal bank row
    anomaly: torch.Tensor  # (M, D) anomaly bank: synthetic rows, then labelled rows
    anomaly_groups: torch.Tensor  # (M,) source image or defect of every anomaly bank row
    n_labelled: int  # rows of the anomaly bank from labelled defects
    queries: PatchTable  # training patches: features, labels, groups (Q, 2), labelled, category
    bars: dict[str, float]  # per category, the nearest-normal distance a synthetic anomaly must exceed
    scale: float  # the distance scale of the representation
    unused_defects: list[str]  # labelled defects that gave no patch


class BankBuilder:
    """Gathers the banks and training patches of a DMAD fit (see the module docstring)."""

    def __init__(self, detector: DMAD, dataset: ImageDataset) -> None:
        self.det = detector
        self.dataset = dataset
        self.samples = dataset.samples
        self.categories = sorted({s.category for s in self.samples})

    def build(self, rng: np.random.Generator) -> Banks:
        """The banks and training patches, drawing the random choices from ``rng``."""
        det, categories = self.det, self.categories
        queries, anomalies, labelled = PatchTable(), PatchTable(), PatchTable()
        pool = self.good_patches(queries, rng)
        self.synthetic_patches(anomalies, queries, rng)
        unused = self.add_labelled(labelled, queries, rng)

        features = pool["features"]
        owners = np.array(categories)[pool["category"].numpy()]
        keep = self.coreset_per_category(
            features, owners, lambda n: max(det.num_neighbors + 1, round(n * det.coreset_ratio)), "normal bank coreset"
        )
        normal_bank, normal_groups = features[keep].contiguous(), pool["groups"][keep]
        del pool, features
        # a generator of its own, so labelled defects do not change which synthetic anomalies count
        bars, scale = self.visibility_bars(queries, normal_bank, normal_groups, np.random.default_rng([det.seed, 23]))
        anomaly_bank, anomaly_groups, n_labelled = self.anomaly_bank(
            anomalies, labelled, bars, normal_bank, normal_groups
        )
        return Banks(
            categories,
            normal_bank,
            normal_groups,
            anomaly_bank,
            anomaly_groups,
            n_labelled,
            queries,
            bars,
            scale,
            unused,
        )

    def good_patches(self, queries: PatchTable, rng: np.random.Generator) -> PatchTable:
        """The normal pool (at most ``max_patches`` random patches per category) and normal training patches."""
        det, samples, categories = self.det, self.samples, self.categories
        per_category = {c: sum(s.category == c for s in samples) for c in categories}
        pool = PatchTable()
        index = 0
        for batch in iterate_batches(self.dataset, det.batch_size, desc="extracting features"):
            emb = det.embed(batch["image"])
            for features in emb.permute(0, 2, 3, 1).reshape(emb.shape[0], -1, emb.shape[1]):
                n_images = per_category[samples[index].category]
                keep = rng.permutation(len(features))[: math.ceil(det.max_patches / n_images)]
                pool.add(
                    features=features[keep],
                    groups=torch.full((len(keep),), index),
                    category=torch.full((len(keep),), categories.index(samples[index].category)),
                )
                ask = rng.permutation(len(features))[: math.ceil(det.max_train_patches / n_images)]
                self.add_queries(
                    queries,
                    features[ask],
                    torch.zeros(len(ask), dtype=torch.bool),
                    (index, NO_GROUP),
                    samples[index].category,
                    labelled=False,
                )
                index += 1
        return pool

    def synthetic_patches(self, anomalies: PatchTable, queries: PatchTable, rng: np.random.Generator) -> None:
        """Patches of synthetic anomalies on up to ``synthetic_images`` training images per category."""
        det, samples = self.det, self.samples
        chosen: list[int] = []
        for category in self.categories:
            members = [i for i, s in enumerate(samples) if s.category == category]
            chosen += sorted(rng.permutation(members)[: det.synthetic_images].tolist())
        synth = SynthDataset(
            det.fit_dataset([samples[i] for i in chosen]),
            GreyKeepingMixture(PerlinTexture(), CutPaste("patch"), CutPaste("scar")),
            seed=det.seed,
        )
        done = 0
        for batch in iterate_batches(synth, det.batch_size, desc="synthetic anomalies"):
            ids = chosen[done : done + len(batch["path"])]
            self.add_anomalous_images(
                batch["synth_image"],
                batch["synth_mask"],
                [(i, NO_GROUP) for i in ids],
                [samples[i].category for i in ids],
                anomalies,
                queries,
                rng,
                labelled=False,
            )
            done += len(ids)

    def visibility_bars(
        self, queries: PatchTable, normal_bank: torch.Tensor, normal_groups: torch.Tensor, rng: np.random.Generator
    ) -> tuple[dict[str, float], float]:
        """Per category, the ``visible_quantile`` of the leave-one-out nearest-normal distances of normal
        patches: the bar a synthetic anomaly must clear to count (one that changed the image but not its
        features is no anomaly). Also the distance scale: their median over all categories."""
        det = self.det
        category = queries.categories()
        plain = np.flatnonzero(~queries["labels"].numpy() & ~queries["labelled"].numpy())
        plain = rng.permutation(plain)[: det.max_train_patches * len(self.categories)]
        reference = nearest_excluding_groups(
            queries["features"][plain], normal_bank, 1, queries["groups"][plain], normal_groups
        ).distances[:, 0]
        scale = float(reference.median().clamp_min(1e-6))
        bars = {
            c: float(reference[torch.from_numpy(category[plain] == c)].quantile(det.visible_quantile))
            for c in self.categories
        }
        return bars, scale

    def anomaly_bank(
        self,
        anomalies: PatchTable,
        labelled: PatchTable,
        bars: dict[str, float],
        normal_bank: torch.Tensor,
        normal_groups: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Coresets of the visible synthetic anomalous patches and of the labelled-defect patches
        (at most ``anomaly_bank_size`` each per category), with their groups and the labelled count."""
        det, samples = self.det, self.samples
        features, groups = anomalies["features"], anomalies["groups"]
        bar = torch.tensor([bars[samples[int(i)].category] for i in groups])
        visible = nearest_excluding_groups(features, normal_bank, 1, groups, normal_groups).distances[:, 0] > bar
        features, groups = features[visible], groups[visible]
        if len(features) < det.num_neighbors + 1:
            raise DefectscopeError(
                f"synthetic anomalies gave only {len(features)} anomalous patches; "
                "use larger images or more synthetic_images"
            )
        owners = np.array([samples[int(i)].category for i in groups])
        keep = self.coreset_per_category(features, owners, lambda n: det.anomaly_bank_size, "anomaly bank coreset")
        real, real_groups = labelled["features"].reshape(-1, features.shape[1]), labelled["groups"].long()
        owners = np.array([det.labelled_defects[int(i) - len(samples)].category for i in real_groups], dtype=object)
        real_keep = self.coreset_per_category(real, owners, lambda n: det.anomaly_bank_size, "labelled anomaly coreset")
        return (
            torch.cat([features[keep], real[real_keep]]).contiguous(),
            torch.cat([groups[keep], real_groups[real_keep]]),
            len(real_keep),
        )

    def coreset_per_category(
        self, features: torch.Tensor, owners: np.ndarray, size: Callable[[int], int], desc: str
    ) -> torch.Tensor:
        """Row indices of a coreset of each category's rows (``size(n)`` of its n rows), so that in a
        unified model every category keeps the bank it would have on its own."""
        chosen = [torch.empty(0, dtype=torch.long)]
        for category in sorted(set(owners.tolist())):
            rows = torch.from_numpy(np.flatnonzero(owners == category))
            chosen.append(rows[self.coreset(features[rows], size(len(rows)), desc)])
        return torch.cat(chosen)

    def coreset(self, features: torch.Tensor, n_select: int, desc: str) -> torch.Tensor | slice:
        """Indices of a greedy coreset of ``n_select`` rows, or all rows when there are not more."""
        if n_select >= len(features):
            return slice(None)
        return greedy_coreset(features, n_select, projection_dim=self.det.projection_dim, seed=self.det.seed, desc=desc)

    def add_anomalous_images(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        groups: list[tuple[int, int]],
        categories: list[str],
        bank: PatchTable,
        queries: PatchTable,
        rng: np.random.Generator,
        labelled: bool,
        bank_group: list[int] | None = None,
    ) -> None:
        """Anomalous patches of ``images`` go to ``bank`` and to the training queries, together with as
        many (at least 32) untouched patches of the same images as normal queries."""
        emb = self.det.embed(images)
        height, width = emb.shape[-2:]
        fractions = patch_fractions(masks, (height, width)).flatten(1)
        flat = emb.permute(0, 2, 3, 1).reshape(emb.shape[0], -1, emb.shape[1])
        for b, features in enumerate(flat):
            bad = anomalous_cells(fractions[b])
            if not bad.any():
                continue
            tag = groups[b][0] if bank_group is None else bank_group[b]
            bank.add(features=features[bad], groups=torch.full((int(bad.sum()),), tag))
            self.add_queries(
                queries, features[bad], torch.ones(int(bad.sum()), dtype=torch.bool), groups[b], categories[b], labelled
            )
            clean = torch.nonzero(fractions[b] == 0)[:, 0]
            clean = clean[torch.from_numpy(rng.permutation(len(clean))[: max(32, int(bad.sum()))])]
            self.add_queries(
                queries, features[clean], torch.zeros(len(clean), dtype=torch.bool), groups[b], categories[b], labelled
            )

    def add_labelled(self, bank: PatchTable, queries: PatchTable, rng: np.random.Generator) -> list[str]:
        """Features of the labelled defects (anomaly-centred views and Crop&Paste); returns the unusable ones."""
        det, samples = self.det, self.samples
        if not det.labelled_defects:
            return []
        unused = []
        defects = det.fit_dataset(det.labelled_defects)
        for j in range(len(defects)):
            item = defects[j]
            image, mask = item["image"], item["mask"]
            if not mask.any():
                unused.append(item["path"])
                warnings.warn(
                    f"{item['path']}: defect mask is empty at image size {det.image_size}; "
                    "this labelled defect is not used",
                    stacklevel=2,
                )
                continue
            group = len(samples) + j
            category = det.labelled_defects[j].category
            views = [(image, mask)] + [centred_view(image, mask, rng) for _ in range(det.defect_views)]
            images, masks = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
            for start in range(0, len(views), det.batch_size):
                stop = min(start + det.batch_size, len(views))
                self.add_anomalous_images(
                    images[start:stop],
                    masks[start:stop],
                    [(group, NO_GROUP)] * (stop - start),
                    [category] * (stop - start),
                    bank,
                    queries,
                    rng,
                    labelled=True,
                )
            if det.croppaste_images:
                same = [i for i, s in enumerate(samples) if s.category == category] or list(range(len(samples)))
                hosts = [same[int(i)] for i in rng.integers(len(same), size=det.croppaste_images)]
                paste = CropPaste([(image, mask.float())])
                good = det.fit_dataset([samples[i] for i in hosts])
                pasted = [
                    paste(good[n]["image"], np.random.default_rng([det.seed, group, n])) for n in range(len(hosts))
                ]
                self.add_anomalous_images(
                    torch.stack([p[0] for p in pasted]),
                    torch.stack([p[1] for p in pasted]),
                    [(i, group) for i in hosts],
                    [category] * len(hosts),
                    bank,
                    queries,
                    rng,
                    labelled=True,
                    bank_group=[group] * len(hosts),
                )
        return unused

    @staticmethod
    def add_queries(
        queries: PatchTable,
        features: torch.Tensor,
        labels: torch.Tensor,
        groups: tuple[int, int],
        category: str,
        labelled: bool,
    ) -> None:
        n = len(features)
        queries.add(
            features=features,
            labels=labels,
            groups=torch.tensor(groups).expand(n, 2),
            labelled=torch.full((n,), labelled),
            category=[category] * n,
        )


def centred_view(
    image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A square crop (60-100 % of the side) centred on a random defect pixel, resized back, flipped
    and turned by a multiple of 90 degrees."""
    size = image.shape[-1]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    pick = int(rng.integers(len(ys)))
    side = max(8, round(size * rng.uniform(0.6, 1.0)))
    top = int(np.clip(int(ys[pick]) - side // 2, 0, size - side))
    left = int(np.clip(int(xs[pick]) - side // 2, 0, size - side))
    crop = image[:, top : top + side, left : left + side]
    crop_mask = mask[top : top + side, left : left + side].float()
    crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    crop_mask = F.interpolate(crop_mask[None, None], size=(size, size), mode="nearest-exact")[0, 0]
    turns, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
    if flip:
        crop, crop_mask = crop.flip(-1), crop_mask.flip(-1)
    return crop.rot90(turns, (-2, -1)), crop_mask.rot90(turns, (-2, -1)) > 0.5
