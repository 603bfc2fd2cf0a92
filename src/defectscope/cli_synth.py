"""The ``defectscope synth`` command: write synthetic anomalies and their masks in MVTec layout."""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import __version__
from .data import ImageDataset, Sample, iterate_batches
from .data.sources import labelled_samples, resolve_category, training_samples
from .data.synth import KINDS, PerlinTexture, SynthDataset, Synthesizer, make_synthesizer
from .errors import DefectscopeError


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) image in [0, 1] -> (H, W, 3) uint8, rounded to the nearest grey level."""
    return np.rint(image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(H, W) bool: where two (H, W, 3) uint8 images differ in any channel."""
    return (before != after).any(axis=-1)


def round_robin(samples: list[Sample], count: int) -> list[Sample]:
    """``count`` samples taken cyclically from ``samples`` (in their sorted order)."""
    return [samples[i % len(samples)] for i in range(count)]


def _empty_or_missing(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def _defect_pairs(args: argparse.Namespace) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[Sample]]:
    """The first ``--defect-images`` labelled defects (sorted) of ``--defects``, as (image, mask) tensors."""
    if args.defect_images < 1:
        raise DefectscopeError(f"--defect-images must be at least 1, got {args.defect_images}")
    root = Path(args.defects).expanduser()
    category = resolve_category(root, args.category if args.category and (root / args.category).is_dir() else None)
    chosen = [s for s in labelled_samples(category) if s.label == 1 and s.mask_path is not None]
    if not chosen:
        raise DefectscopeError(f"{category}: no labelled defect images with masks under test/ and ground_truth/")
    chosen = chosen[: args.defect_images]
    items = ImageDataset(chosen, args.image_size)
    pairs = []
    for sample, item in zip(chosen, (items[i] for i in range(len(items)))):
        if not item["mask"].any():
            raise DefectscopeError(f"{sample.mask_path}: mask is empty at {args.image_size} px, so it gives no defect region")
        pairs.append((item["image"], item["mask"]))
    return pairs, chosen


def _synthesizer(args: argparse.Namespace) -> tuple[Synthesizer, list[str]]:
    """The synthesiser the arguments ask for, and lines describing its sources for README.txt."""
    if args.textures and args.kind != "perlin":
        raise DefectscopeError(f"--textures is used by --kind perlin only, not {args.kind}")
    if args.defects and args.kind != "croppaste":
        raise DefectscopeError(f"--defects is used by --kind croppaste only, not {args.kind}")
    if args.kind == "croppaste":
        if not args.defects:
            raise DefectscopeError("--kind croppaste needs --defects CATEGORY_DIR (labelled defects with masks)")
        pairs, chosen = _defect_pairs(args)
        print(f"defect regions from {len(chosen)} labelled images:", file=sys.stderr)
        for sample in chosen:
            print(f"  {sample.path}  (mask {sample.mask_path})", file=sys.stderr)
        lines = [f"defect regions from {len(chosen)} labelled images:"]
        lines += [f"  {s.path} (mask {s.mask_path})" for s in chosen]
        return make_synthesizer("croppaste", defects=pairs), lines
    synthesizer = make_synthesizer(args.kind, texture_dir=args.textures)
    if isinstance(synthesizer, PerlinTexture):
        where = f" ({Path(args.textures).expanduser().resolve()})" if args.textures else ""
        return synthesizer, [f"texture source: {synthesizer.texture_source}{where}"]
    return synthesizer, []


def cmd_synth(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise DefectscopeError(f"--count must be at least 1, got {args.count}")
    if args.image_size < 8:
        raise DefectscopeError(f"--image-size must be at least 8 pixels, got {args.image_size}")
    if args.seed < 0:
        raise DefectscopeError(f"--seed must be non-negative, got {args.seed}")
    out = Path(args.out).expanduser()
    image_dir, mask_dir = out / "test" / args.kind, out / "ground_truth" / args.kind
    for folder in (image_dir, mask_dir):
        if not _empty_or_missing(folder):
            raise DefectscopeError(f"{folder}: output folder exists and is not empty; choose another --out or remove it")
    category = resolve_category(args.data, args.category)
    good = training_samples(category)
    synthesizer, source_lines = _synthesizer(args)

    dataset = SynthDataset(ImageDataset(round_robin(good, args.count), args.image_size), synthesizer, seed=args.seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(args.count - 1)))
    unchanged = 0
    for index, batch in enumerate(iterate_batches(dataset, batch_size=1, desc=f"synth {args.kind}")):
        before, after = to_uint8(batch["image"][0]), to_uint8(batch["synth_image"][0])
        mask = changed_pixels(before, after)  # exactly the pixels that differ in the written files
        unchanged += not mask.any()
        name = f"{index:0{digits}d}"
        Image.fromarray(after).save(image_dir / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{name}_mask.png")

    _append_readme(out, args, category, len(good), source_lines)
    if unchanged:
        print(f"note: {unchanged} of {args.count} images came out without any changed pixel (empty mask)",
              file=sys.stderr)
    print(f"wrote {args.count} {args.kind} images to {image_dir}/ and their masks to {mask_dir}/ "
          f"(from {len(good)} good images of {category}); notes in {out / 'README.txt'}")
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    words = ["defectscope", "synth", args.data, "--kind", args.kind, "--count", str(args.count), "--out", args.out,
             "--image-size", str(args.image_size), "--seed", str(args.seed)]
    for flag, value in (("--category", args.category), ("--textures", args.textures), ("--defects", args.defects)):
        if value:
            words += [flag, value]
    if args.kind == "croppaste":
        words += ["--defect-images", str(args.defect_images)]
    return shlex.join(str(w) for w in words)


def _append_readme(out: Path, args: argparse.Namespace, category: Path, n_good: int, source_lines: list[str]) -> None:
    """Add a section describing this run to ``out/README.txt`` (earlier sections are kept)."""
    lines = [
        f"## {args.kind}: {args.count} synthetic anomalies ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        f"written by defectscope {__version__}: {_command_line(args)}",
        f"good images: {n_good} from {Path(category).resolve()} (train/good, sorted, used round-robin)",
        f"image size: {args.image_size} px, seed: {args.seed} (image i uses numpy default_rng([seed, 0, i]))",
        *source_lines,
        (f"images: test/{args.kind}/NNN.png; masks: ground_truth/{args.kind}/NNN_mask.png "
         "(255 = pixel differs from the resized good image, 0 = identical)"),
    ]
    readme = out / "README.txt"
    previous = readme.read_text() + "\n" if readme.is_file() else ""
    readme.write_text(previous + "\n".join(lines) + "\n")


def add_synth_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``synth`` command to an argparse subparsers object."""
    synth = sub.add_parser(
        "synth", help="write synthetic anomalies (perlin, cutpaste, scar, croppaste) with exact masks",
        description="Make N anomalous images from the good images of DATA (train/good, round-robin) and write "
                    "them in MVTec layout: OUT/test/<kind>/NNN.png and OUT/ground_truth/<kind>/NNN_mask.png "
                    "(0/255, exactly the changed pixels), plus notes in OUT/README.txt.")
    synth.add_argument("data", metavar="DATA", help="an MVTec-layout category folder (uses train/good), a dataset "
                       "root holding categories (with --category) or a plain folder of good images")
    synth.add_argument("--kind", required=True, choices=KINDS, help="anomaly kind")
    synth.add_argument("--count", type=int, required=True, metavar="N", help="number of images to write")
    synth.add_argument("--out", required=True, metavar="DIR", help="output folder (test/<kind> must not hold files yet)")
    synth.add_argument("--category", help="category to use when DATA is a root holding several")
    synth.add_argument("--textures", metavar="DIR", help="perlin: folder of texture images (default: the good "
                       "images themselves, heavily augmented)")
    synth.add_argument("--defects", metavar="CATEGORY_DIR", help="croppaste: MVTec-layout category whose labelled "
                       "test defects (with ground_truth masks) provide the pasted regions")
    synth.add_argument("--defect-images", type=int, default=5, metavar="K",
                       help="croppaste: use the first K labelled defect images, sorted (default: %(default)s)")
    synth.add_argument("--image-size", type=int, default=256, help="square output size in pixels (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synth.set_defaults(func=cmd_synth)
    return synth
