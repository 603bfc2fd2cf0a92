"""``defectscope synth``: write synthetic anomalies and their masks in MVTec layout."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from ..data.synth import KINDS
from ..runs import synth_run
from .common import info, non_negative_int, positive_int


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    words = [
        "defectscope",
        "synth",
        args.data,
        "--kind",
        args.kind,
        "--count",
        str(args.count),
        "--out",
        args.out,
        "--image-size",
        str(args.image_size),
        "--seed",
        str(args.seed),
    ]
    for flag, value in (("--category", args.category), ("--textures", args.textures), ("--defects", args.defects)):
        if value:
            words += [flag, value]
    if args.kind == "croppaste":
        words += ["--defect-images", str(args.defect_images)]
    return shlex.join(str(w) for w in words)


def run(args: argparse.Namespace) -> int:
    result = synth_run(
        args.data,
        args.kind,
        args.count,
        args.out,
        category=args.category,
        textures=args.textures,
        defects=args.defects,
        defect_images=args.defect_images,
        image_size=args.image_size,
        seed=args.seed,
        command_line=_command_line(args),
        log=info,
    )
    if result.unchanged:
        info(f"note: {result.unchanged} of {result.count} images came out without any changed pixel (empty mask)")
    print(
        f"wrote {result.count} {args.kind} images to {result.image_dir}/ and their masks to {result.mask_dir}/ "
        f"(from {result.n_good} good images of {result.category}); notes in {result.readme}"
    )
    return 0


def add_parser(sub: Any) -> None:
    synth = sub.add_parser(
        "synth",
        help="write synthetic anomalies (perlin, cutpaste, scar, croppaste) with exact masks",
        description="Make N anomalous images from the good images of DATA (train/good, round-robin) and write "
        "them in MVTec layout: OUT/test/<kind>/NNN.png and OUT/ground_truth/<kind>/NNN_mask.png "
        "(0/255, exactly the changed pixels), plus notes in OUT/README.txt.",
    )
    synth.add_argument(
        "data",
        metavar="DATA",
        help="an MVTec-layout category folder (uses train/good), a dataset "
        "root holding categories (with --category) or a plain folder of good images",
    )
    synth.add_argument("--kind", required=True, choices=KINDS, help="anomaly kind")
    synth.add_argument("--count", type=positive_int, required=True, metavar="N", help="number of images to write")
    synth.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (test/<kind> must not hold files yet)"
    )
    synth.add_argument("--category", help="category to use when DATA is a root holding several")
    synth.add_argument(
        "--textures",
        metavar="DIR",
        help="perlin: folder of texture images (default: the good images themselves, heavily augmented)",
    )
    synth.add_argument(
        "--defects",
        metavar="CATEGORY_DIR",
        help="croppaste: MVTec-layout category whose labelled "
        "test defects (with ground_truth masks) provide the pasted regions",
    )
    synth.add_argument(
        "--defect-images",
        type=positive_int,
        default=5,
        metavar="K",
        help="croppaste: use the first K labelled defect images, sorted (default: %(default)s)",
    )
    synth.add_argument(
        "--image-size", type=positive_int, default=256, help="square output size in pixels (default: %(default)s)"
    )
    synth.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: %(default)s)")
    synth.set_defaults(func=run)
