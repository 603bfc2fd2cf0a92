"""The cost of writing a test report's images, alone and beside a model scoring ~11 images/s.

40 MVTec bottle test images (900 x 900 px native, 10 of each type, ground-truth masks for the
defects) with synthetic smooth anomaly maps at 256 x 256 (the working resolution), decoded before
timing. Compared:

- ``old``: what ``defectscope test`` wrote before ReportImages, in the calling thread: the overlay
  as PNG at 256 x 256 and the input as JPEG at 256 x 256 (from the 256 x 256 tensors the model saw);
- ``new, calling thread``: ReportImages with ``threads=0`` (thumbnail, full-resolution overlay and input);
- ``new, N threads``: ReportImages as ``defectscope test`` uses it (2 threads).

"Writing alone" times queueing every image and committing the folder. "Beside a model" runs a
stand-in for the model in the calling thread (torch matrix products taking ~1/11 s per image on
all of torch's threads) and writes each image as the model finishes it (runs interleaved, the
best of each kept), and projects the rates with a model that leaves the CPU free (on a GPU).
Writes JSON to ``bench/results/overlays.json``.

    python bench/bench_overlays.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from common import environment
from defectscope.outputs import atomic_save_image, make_folder
from defectscope.report.images import ReportImages
from defectscope.report.overlay import colorize, display_max, unique_names


# The earlier writer's drawing (float blend at the 256 px working size), kept here to measure against.
def to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) image in [0, 1] -> (H, W, 3) uint8."""
    return (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).astype(np.uint8)


def overlay(
    image: torch.Tensor, amap: torch.Tensor, vmax: float, mask: torch.Tensor | None = None, alpha: float = 0.45
) -> Image.Image:
    """Blend the colourised map (scaled to [0, vmax]) over the image; outline the mask in green."""
    rgb = to_rgb(image).astype(np.float32)
    heat = colorize(amap.numpy() / max(vmax, 1e-12)).astype(np.float32)
    out = (rgb * (1 - alpha) + heat * alpha).astype(np.uint8)
    if mask is not None and bool(mask.any()):
        m = mask.numpy().astype(bool)
        edge = m & ~ndimage.binary_erosion(m, iterations=2)
        out[edge] = (0, 255, 0)
    return Image.fromarray(out)


REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "mvtec_bottle" / "bottle"
RESULTS = REPO / "bench" / "results" / "overlays.json"
WORKING = 256
MODEL_RATE = 11.0  # images/s of the stand-in model
THRESHOLD = 1.0
OLD = "old (256 px PNG + JPEG, calling thread)"
NEW = "new, 2 threads (as defectscope test)"
BESIDE = ("none", OLD, NEW)
CALLING = "new, calling thread"
IN_CALLING_THREAD = {OLD, CALLING}


@dataclass
class Item:
    """One scored image as the geometry gives it, plus the 256 px tensors the old writer used."""

    path: str
    score: float
    map: np.ndarray
    size: tuple[int, int]
    image: np.ndarray
    mask: np.ndarray | None
    reconstruction: np.ndarray | None
    tensor: torch.Tensor  # (3, 256, 256) in [0, 1]
    mask_tensor: torch.Tensor | None  # (256, 256)


def load_items(root: Path, per_type: int, seed: int = 0) -> list[Item]:
    rng = np.random.default_rng(seed)
    items = []
    for kind in sorted(p.name for p in (root / "test").iterdir()):
        for path in sorted((root / "test" / kind).glob("*.png"))[:per_type]:
            image = np.asarray(Image.open(path).convert("RGB"))
            noise = ndimage.gaussian_filter(rng.random((WORKING, WORKING)).astype(np.float32), 8)
            amap = 0.2 + 0.6 * (noise - noise.min()) / (noise.max() - noise.min())
            mask = None
            if kind != "good":
                mask = np.asarray(Image.open(root / "ground_truth" / kind / f"{path.stem}_mask.png")) > 0
                small = np.asarray(Image.fromarray(mask).resize((WORKING, WORKING))).astype(np.float32)
                amap = amap + ndimage.gaussian_filter(small, 6) * rng.uniform(0.5, 1.5)
            resized = np.asarray(Image.fromarray(image).resize((WORKING, WORKING), Image.Resampling.BILINEAR))
            items.append(
                Item(
                    str(path),
                    float(amap.max()),
                    amap.astype(np.float32),
                    image.shape[:2],
                    image,
                    mask,
                    None,
                    torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255.0,
                    None
                    if mask is None
                    else torch.from_numpy(np.array(Image.fromarray(mask).resize((WORKING, WORKING)))),
                )
            )
    return items


class OldWriter:
    """The writes of the earlier ``_OverlayWriter``: overlay PNG and input JPEG at 256 px, in the calling thread."""

    def __init__(self, folder: Path, paths: list[str], threshold: float | None) -> None:
        self.root = make_folder(folder / "overlays" / "inputs", "overlays").parent
        self.names = dict(zip(paths, unique_names(paths)))
        self.threshold = threshold

    def add(self, item: Item) -> str:
        name = self.names[item.path]
        amap = torch.from_numpy(item.map)
        image = overlay(item.tensor, amap, display_max(self.threshold, amap), item.mask_tensor)
        atomic_save_image(self.root / f"{name}.png", image)
        atomic_save_image(self.root / "inputs" / f"{name}.jpg", Image.fromarray(to_rgb(item.tensor)), quality=90)
        return f"overlays/{name}.png"

    def commit(self) -> None:
        pass


class NoWriter:
    def add(self, item: Item) -> str:
        return ""

    def commit(self) -> None:
        pass


def make_model(rate: float) -> Callable[[], None]:
    """A stand-in for a model: matrix products taking about ``1 / rate`` s per image."""
    a = torch.randn(512, 512)

    def product_seconds() -> float:
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        return (time.perf_counter() - start) / 10

    product_seconds()
    each = float(np.median([product_seconds() for _ in range(7)]))
    reps = max(1, round(1.0 / rate / each))

    def score() -> None:
        for _ in range(reps):
            a @ a

    return score


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(items: list[Item], make_writer: Callable[[Path], Any], score: Callable[[], None] | None, out: Path) -> dict:
    """Write every item (after ``score()`` for each, if given); wall and CPU seconds, bytes written."""
    folder = Path(tempfile.mkdtemp(dir=out))
    writer = make_writer(folder)
    wall, cpu = time.perf_counter(), time.process_time()
    for item in items:
        if score is not None:
            score()
        writer.add(item)
    writer.commit()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    written = folder_bytes(folder)
    shutil.rmtree(folder)
    return {"seconds": wall, "cpu_seconds": cpu, "bytes": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--per-type", type=int, default=10, help="images of each test type (4 types)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each writer alone (the fastest is kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tmp", type=Path, default=None, help="folder to write into (default: the system's)")
    args = parser.parse_args()
    items = load_items(args.data, args.per_type)
    paths = [i.path for i in items]
    writers: dict[str, Callable[[Path], Any]] = {
        "none": lambda f: NoWriter(),
        OLD: lambda f: OldWriter(f, paths, THRESHOLD),
        CALLING: lambda f: ReportImages(f, paths, THRESHOLD, threads=0),
        "new, 1 thread": lambda f: ReportImages(f, paths, THRESHOLD, threads=1),
        NEW: lambda f: ReportImages(f, paths, THRESHOLD, threads=2),
    }
    out = Path(tempfile.mkdtemp(prefix="bench-overlays-", dir=args.tmp))
    try:
        filesystem = subprocess.run(["stat", "-f", "-c", "%T", str(out)], capture_output=True, text=True).stdout.strip()
        alone = {}
        for name, make in writers.items():
            if name == "none":
                continue
            best = min((run(items, make, None, out) for _ in range(args.repeats)), key=lambda r: r["seconds"])
            alone[name] = {
                "images_per_second": round(len(items) / best["seconds"], 1),
                "ms_per_image": round(1000 * best["seconds"] / len(items), 2),
                "cpu_ms_per_image": round(1000 * best["cpu_seconds"] / len(items), 2),
                "kib_per_image": round(best["bytes"] / len(items) / 1024, 1),
            }
            print(f"alone  {name:40s} {alone[name]}")
        score = make_model(MODEL_RATE)
        beside: dict[str, dict[str, float]] = {}
        for _ in range(
            max(1, args.repeats - 1)
        ):  # interleaved, so a busy moment of the machine hits every writer alike
            for name in BESIDE:
                rate = len(items) / run(items, writers[name], score, out)["seconds"]
                entry = beside.setdefault(name, {"images_per_second": 0.0})
                entry["images_per_second"] = round(max(entry["images_per_second"], rate), 2)
        base = beside["none"]["images_per_second"]
        for name, entry in beside.items():
            entry["share_of_model_rate"] = round(entry["images_per_second"] / base, 3)
            print(f"beside {name:40s} {entry}")
        # A model that leaves the CPU free (on a GPU): writes in the calling thread add their time to
        # each image's; writes in threads cost nothing while they keep up with the model.
        free_cpu = {
            name: round(
                1 / (1 / MODEL_RATE + entry["ms_per_image"] / 1000)
                if name in IN_CALLING_THREAD
                else min(MODEL_RATE, entry["images_per_second"]),
                2,
            )
            for name, entry in alone.items()
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "environment": {**environment(), "output_filesystem": filesystem},
        "images": {
            "n": len(items),
            "data": str(args.data.relative_to(REPO.parent))
            if args.data.is_relative_to(REPO.parent)
            else str(args.data),
            "native_size": list(items[0].size),
            "map_size": [WORKING, WORKING],
            "defects_with_masks": sum(i.mask is not None for i in items),
        },
        "writing_alone": alone,
        "model_stand_in": f"torch matrix products, ~{MODEL_RATE:g} images/s on {torch.get_num_threads()} torch threads",
        "beside_model": beside,
        "projected_images_per_second_with_a_model_leaving_the_cpu_free": {
            "model": MODEL_RATE,
            **free_cpu,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
