"""``synth_run``: write synthetic anomalies with their exact masks in MVTec layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..data import ImageDataset, Sample, iterate_batches
from ..data.sources import labelled_samples, resolve_category, training_samples
from ..data.synth import PerlinTexture, SynthDataset, Synthesizer, make_synthesizer
from ..errors import DefectscopeError
from ..outputs import atomic_save_image, atomic_write, require_empty_folder
from ..progress import Log, quiet


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) image in [0, 1] -> (H, W, 3) uint8, rounded to the nearest grey level."""
    return np.rint(image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(H, W) bool: where two (H, W, 3) uint8 images differ in any channel."""
    return (before != after).any(axis=-1)


def round_robin(samples: list[Sample], count: int) -> list[Sample]:
    """``count`` samples taken cyclically from ``samples`` (in their sorted order)."""
    return [samples[i % len(samples)] for i in range(count)]


@dataclass
class SynthResult:
    """What ``synth_run`` wrote."""

    image_dir: Path
    mask_dir: Path
    count: int
    n_good: int
    category: Path
    unchanged: int  # images that came out without any changed pixel (empty mask)
    readme: Path


def _defect_pairs(
    defects: str | os.PathLike[str], category: str | None, k: int, image_size: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[Sample]]:
    """The first ``k`` labelled defects (sorted) of ``defects``, as (image, mask) tensors."""
    if k < 1:
        raise DefectscopeError(f"--defect-images must be at least 1, got {k}")
    root = Path(defects).expanduser()
    folder = resolve_category(root, category if category and (root / category).is_dir() else None)
    chosen = [s for s in labelled_samples(folder) if s.label == 1 and s.mask_path is not None]
    if not chosen:
        raise DefectscopeError(f"{folder}: no labelled defect images with masks under test/ and ground_truth/")
    chosen = chosen[:k]
    items = ImageDataset(chosen, image_size)
    pairs = []
    for sample, item in zip(chosen, (items[i] for i in range(len(items)))):
        if not item["mask"].any():
            raise DefectscopeError(
                f"{sample.mask_path}: mask is empty at {image_size} px, so it gives no defect region"
            )
        pairs.append((item["image"], item["mask"]))
    return pairs, chosen


def _synthesizer(
    kind: str,
    textures: str | os.PathLike[str] | None,
    defects: str | os.PathLike[str] | None,
    category: str | None,
    defect_images: int,
    image_size: int,
) -> tuple[Synthesizer, list[str]]:
    """The synthesiser asked for, and lines describing its sources for README.txt."""
    if textures and kind != "perlin":
        raise DefectscopeError(f"--textures is used by --kind perlin only, not {kind}")
    if defects and kind != "croppaste":
        raise DefectscopeError(f"--defects is used by --kind croppaste only, not {kind}")
    if kind == "croppaste":
        if not defects:
            raise DefectscopeError("--kind croppaste needs --defects CATEGORY_DIR (labelled defects with masks)")
        pairs, chosen = _defect_pairs(defects, category, defect_images, image_size)
        lines = [f"defect regions from {len(chosen)} labelled images:"]
        lines += [f"  {s.path} (mask {s.mask_path})" for s in chosen]
        return make_synthesizer("croppaste", defects=pairs), lines
    synthesizer = make_synthesizer(kind, texture_dir=textures)
    if isinstance(synthesizer, PerlinTexture):
        where = f" ({Path(textures).expanduser().resolve()})" if textures else ""
        return synthesizer, [f"texture source: {synthesizer.texture_source}{where}"]
    return synthesizer, []


def synth_run(
    data: str | os.PathLike[str],
    kind: str,
    count: int,
    out: str | os.PathLike[str],
    *,
    category: str | None = None,
    textures: str | os.PathLike[str] | None = None,
    defects: str | os.PathLike[str] | None = None,
    defect_images: int = 5,
    image_size: int = 256,
    seed: int = 0,
    command_line: str = "",
    log: Log = quiet,
) -> SynthResult:
    """Make ``count`` anomalous images from the good images of ``data`` (train/good, round-robin).

    Writes ``out/test/<kind>/NNN.png`` and ``out/ground_truth/<kind>/NNN_mask.png`` (0 / 255,
    exactly the changed pixels) and appends a section to ``out/README.txt``; those two folders
    must not hold files yet.
    """
    if count < 1:
        raise DefectscopeError(f"--count must be at least 1, got {count}")
    if image_size < 8:
        raise DefectscopeError(f"--image-size must be at least 8 pixels, got {image_size}")
    if seed < 0:
        raise DefectscopeError(f"--seed must be non-negative, got {seed}")
    root = Path(out).expanduser()
    image_dir, mask_dir = root / "test" / kind, root / "ground_truth" / kind
    for folder in (image_dir, mask_dir):
        require_empty_folder(folder)
    source = resolve_category(data, category)
    good = training_samples(source)
    synthesizer, source_lines = _synthesizer(kind, textures, defects, category, defect_images, image_size)
    for line in source_lines:
        log(line)
    dataset = SynthDataset(ImageDataset(round_robin(good, count), image_size), synthesizer, seed=seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(count - 1)))
    unchanged = 0
    for index, batch in enumerate(iterate_batches(dataset, batch_size=1, desc=f"synth {kind}")):
        before, after = to_uint8(batch["image"][0]), to_uint8(batch["synth_image"][0])
        mask = changed_pixels(before, after)  # exactly the pixels that differ in the written files
        unchanged += not mask.any()
        name = f"{index:0{digits}d}"
        atomic_save_image(image_dir / f"{name}.png", Image.fromarray(after))
        atomic_save_image(mask_dir / f"{name}_mask.png", Image.fromarray(mask.astype(np.uint8) * 255))
    lines = [
        f"## {kind}: {count} synthetic anomalies ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        f"written by defectscope {__version__}" + (f": {command_line}" if command_line else ""),
        f"good images: {len(good)} from {Path(source).resolve()} (train/good, sorted, used round-robin)",
        f"image size: {image_size} px, seed: {seed} (image i uses numpy default_rng([seed, 0, i]))",
        *source_lines,
        (
            f"images: test/{kind}/NNN.png; masks: ground_truth/{kind}/NNN_mask.png "
            "(255 = pixel differs from the resized good image, 0 = identical)"
        ),
    ]
    readme = root / "README.txt"
    previous = readme.read_text() + "\n" if readme.is_file() else ""
    atomic_write(readme, previous + "\n".join(lines) + "\n")
    return SynthResult(image_dir, mask_dir, count, len(good), Path(source), unchanged, readme)
