"""Time the full metric set (image + pixel + AUPRO) on the MVTec AD bottle test split.

Ground-truth masks of all 83 test images are resized to 256x256 (5.4M pixels); anomaly maps are
a deterministic stand-in for a detector (blurred mask plus noise) so the numbers are realistic
but need no model. Prints the median time of a few runs as a Markdown table row.

    python bench/bench_metrics.py [--datasets DIR] [--size 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from defectscope.metrics import compute_metrics  # noqa: E402


def default_datasets() -> Path:
    env = os.environ.get("DEFECTSCOPE_DATASETS")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


def load_bottle_masks(bottle: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image labels (N,) and masks (N, size, size) of the bottle test split, sorted by path."""
    paths = sorted((bottle / "test").glob("*/*.png"))
    if not paths:
        raise SystemExit(f"no test images under {bottle / 'test'}")
    labels, masks = [], []
    for path in paths:
        defect = path.parent.name
        if defect == "good":
            labels.append(False)
            masks.append(np.zeros((size, size), dtype=bool))
            continue
        mask_path = bottle / "ground_truth" / defect / f"{path.stem}_mask.png"
        with Image.open(mask_path) as im:
            small = im.convert("L").resize((size, size), Image.NEAREST)
        labels.append(True)
        masks.append(np.asarray(small) > 0)
    return np.array(labels), np.stack(masks)


def synthetic_maps(masks: np.ndarray, seed: int = 0) -> np.ndarray:
    """Blurred masks plus noise, float32: a plausible, imperfect detector output."""
    rng = np.random.default_rng(seed)
    blurred = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 4, 4))
    return (blurred + rng.normal(0.0, 0.25, masks.shape)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=default_datasets())
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    labels, masks = load_bottle_masks(args.datasets / "mvtec_bottle" / "bottle", args.size)
    maps = synthetic_maps(masks)
    scores = maps.reshape(len(maps), -1).max(axis=1)

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = compute_metrics(labels, scores, masks, maps)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)

    command = "python bench/bench_metrics.py" + (f" --size {args.size}" if args.size != 256 else "")
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    numbers = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
    n, h, w = masks.shape
    what = f"compute_metrics, bottle test {n}x{h}x{w} ({masks.size / 1e6:.1f}M px)"
    print("| benchmark | command | median time | result | machine | date |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {what} | `{command}` | {median:.3f} s (median of {args.repeats}) | {numbers} "
        f"| {machine} | {datetime.date.today().isoformat()} |"
    )


if __name__ == "__main__":
    main()
