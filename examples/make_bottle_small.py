"""Build examples/bottle_small: a small, downscaled MVTec AD bottle subset for demos and offline tests.

Usage: python examples/make_bottle_small.py [SOURCE_CATEGORY_DIR] [DEST_DIR]
Images are picked evenly spaced by sorted name (deterministic), resized to 256x256 with Lanczos
and saved as PNG; masks are resized nearest-neighbour and stored as 0/255 PNG ``<stem>_mask.png``.
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIZE = (256, 256)
COUNTS = {"train/good": 30, "test/good": 8, "test/broken_large": 3, "test/broken_small": 3, "test/contamination": 3}


def evenly_spaced(paths: list[Path], count: int) -> list[Path]:
    """``count`` paths spread evenly over the sorted list, first and last included."""
    return [paths[i] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=REPO.parent / "shared/datasets/mvtec_bottle/bottle")
    parser.add_argument("dest", nargs="?", type=Path, default=REPO / "examples/bottle_small")
    args = parser.parse_args()

    for sub, count in COUNTS.items():
        out_dir = args.dest / sub
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in evenly_spaced(sorted((args.source / sub).glob("*.png")), count):
            image = Image.open(src).convert("RGB").resize(SIZE, Image.Resampling.LANCZOS)
            image.save(out_dir / src.name, optimize=True)
            defect = sub.split("/")[1]
            if defect == "good":
                continue
            mask_name = f"{src.stem}_mask.png"
            mask = Image.open(args.source / "ground_truth" / defect / mask_name).convert("L")
            mask = np.asarray(mask.resize(SIZE, Image.Resampling.NEAREST)) > 0
            if not mask.any():
                raise SystemExit(f"{src}: mask is empty after downscaling; pick another image")
            mask_dir = args.dest / "ground_truth" / defect
            mask_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / mask_name, optimize=True)
    shutil.copy(args.source.parent / "LICENSE.mvtec.txt", args.dest / "LICENSE.mvtec.txt")


if __name__ == "__main__":
    main()
