"""Misalignment: PaDiM, PatchCore and FYD on the original and on randomly moved copies of mvtec_bottle and mtd.

The misaligned copy of a category gives every train and test image its own seeded random similarity
transform about the image centre: rotation uniform in +-15 degrees, shift uniform in +-10 % of the
side along each axis, scale uniform in [0.9, 1.1]. Images are resampled bilinearly with mirrored
borders (scipy.ndimage ``mode="mirror"``, so no constant frame appears), each mask with the same
transform by nearest neighbour, zero outside; everything is written as PNG. The copies are built
once under ``--work`` (rebuilt when the seed changes).

Each (dataset, variant, method) is fitted with ``fit_run`` at the method's defaults and tested with
``evaluate_run`` (pixel metrics at the maps' square 256 px resolution, the papers' protocol; no
overlays). FYD trains its alignment on at most 300 seeded fitting images (its ``max_train_images``
default: 300 of mtd's 686), its Gaussians use them all. One JSON per run is written to
``bench/results/misalign/`` as soon as it finishes (a rerun skips the finished ones unless
``--force``); the summary goes to ``bench/results/misalign.json``.

    python bench/bench_misalign.py                          # build the copies, run everything, the table
    python bench/bench_misalign.py --only bottle-misaligned-fyd
    python bench/bench_misalign.py --analyse-only           # the table from the saved results
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common import add_datasets_root, environment, f3, finish_summary, finite_or_none, saved_ok, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATASETS = {"bottle": "mvtec_bottle/bottle", "mtd": "mtd/magnetic_tile"}
VARIANTS = ("original", "misaligned")
METHODS = ("padim", "patchcore", "fyd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_ROTATION, MAX_SHIFT, MAX_SCALE = 15.0, 0.10, 0.10
CONFIGS = [
    {"name": f"{data}-{variant}-{method}", "dataset": data, "variant": variant, "method": method}
    for data in DATASETS
    for variant in VARIANTS
    for method in METHODS
]


# -- the misaligned copies -----------------------------------------------------------------------------
def draw_transform(seed: int, key: str) -> dict[str, float]:
    """The seeded random move of the image at relative path ``key`` (its mask shares it)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return {
        "rotation_deg": float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
        "shift_x": float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)),
        "shift_y": float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)),
        "scale": float(rng.uniform(1 - MAX_SCALE, 1 + MAX_SCALE)),
    }


def move(pixels: np.ndarray, t: dict[str, float], mask: bool) -> np.ndarray:
    """``pixels`` (H, W) or (H, W, C) rotated, scaled about the centre and shifted by ``t``."""
    from scipy.ndimage import affine_transform

    h, w = pixels.shape[:2]
    angle = math.radians(t["rotation_deg"])
    forward = t["scale"] * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    shift = np.array([t["shift_y"] * h, t["shift_x"] * w])
    inverse = np.linalg.inv(forward)  # output (row, col) -> input (row, col)
    offset = centre - inverse @ (centre + shift)
    channels = pixels[..., None] if pixels.ndim == 2 else pixels
    out = np.stack(
        [
            affine_transform(
                channels[..., c].astype(np.float32),
                inverse,
                offset=offset,
                order=0 if mask else 1,
                mode="constant" if mask else "mirror",
                cval=0.0,
            )
            for c in range(channels.shape[-1])
        ],
        axis=-1,
    )
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out[..., 0] if pixels.ndim == 2 else out


def build_misaligned(source: Path, target: Path, seed: int) -> dict[str, Any]:
    """A copy of the category ``source`` at ``target`` with every image and mask moved; reused when present."""
    from PIL import Image

    marker = target / "misalignment.json"
    if marker.exists() and json.loads(marker.read_text()).get("seed") == seed:
        return json.loads(marker.read_text())
    if target.exists():
        shutil.rmtree(target)
    started = time.perf_counter()
    moves: dict[str, dict[str, float]] = {}
    for split in ("train", "test"):
        for path in sorted((source / split).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            key = str(path.relative_to(source).with_suffix(""))
            t = moves[key] = draw_transform(seed, key)
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB"))
            out = target / path.relative_to(source).with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(move(pixels, t, mask=False)).save(out)
            if split == "test" and path.parent.name != "good":
                mask_path = source / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
                if mask_path.exists():
                    with Image.open(mask_path) as im:
                        mask = np.asarray(im.convert("L"))
                    mask_out = target / mask_path.relative_to(source)
                    mask_out.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(move(mask, t, mask=True)).save(mask_out)
    record = {
        "seed": seed,
        "source": str(source),
        "n_images": len(moves),
        "ranges": {"rotation_deg": MAX_ROTATION, "shift": MAX_SHIFT, "scale": MAX_SCALE},
        "seconds": round(time.perf_counter() - started, 1),
        "moves": moves,
    }
    write_json(marker, record)
    return record


# -- one run -------------------------------------------------------------------------------------------
def run_config(cfg: dict[str, Any], data_dir: Path, work: Path) -> dict[str, Any]:
    """Fit and test one configuration through the run layer; the record of what was measured (or the error)."""
    from defectscope.runs import evaluate_run, fit_run

    run = work / "runs" / cfg["name"]
    record: dict[str, Any] = {
        **cfg,
        "data_dir": str(data_dir),
        "run_dir": str(run),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(),
    }
    try:
        if run.exists():  # a fresh run: no checkpoint of an earlier one to refuse or resume
            shutil.rmtree(run)
        start = time.perf_counter()
        fitted = fit_run(data_dir, run, method=cfg["method"], overwrite=True)
        fit_wall = time.perf_counter() - start
        info = fitted.detector.fit_info
        record["params"] = fitted.detector.get_params()
        record["fit"] = {
            "fit_seconds": info.get("fit_seconds"),
            "wall_s": round(fit_wall, 2),
            "n_fit_images": info.get("n_fit_images"),
            "n_calibration_images": info.get("n_calibration_images"),
            **{k: info[k] for k in ("training", "alignment") if k in info},
        }
        start = time.perf_counter()
        result = evaluate_run(
            run, data_dir, out=run / "test", overlays=False, pixel_resolution="square", overwrite=True
        )
        (part,) = result.parts
        record["test"] = {
            "wall_s": round(time.perf_counter() - start, 2),
            "images_per_second": part.images_per_second,
            "n_images": len(part.records),
            "n_errors": part.n_errors,
            "metrics": {k: finite_or_none(v) for k, v in part.metrics.items()},
            "notes": part.notes,
        }
        record["status"] = "ok"
    except Exception as exc:  # a failed configuration is recorded, and the next one goes on
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return record


# -- the table -----------------------------------------------------------------------------------------


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| data | variant | method | image AUROC | pixel AUROC | AUPRO | fit s | test img/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        if r["status"] != "ok":
            lines.append(f"| {r['dataset']} | {r['variant']} | {r['method']} | failed: {r['error'][:160]} | | | | |")
            continue
        m = r["test"]["metrics"]
        lines.append(
            f"| {r['dataset']} | {r['variant']} | {r['method']} | {f3(m.get('image_auroc'))} | "
            f"{f3(m.get('pixel_auroc'))} | {f3(m.get('aupro'))} | {r['fit']['fit_seconds']:.1f} | "
            f"{r['test']['images_per_second']:.1f} |"
        )
    lines += ["", "FYD - PaDiM, in AUROC points (image / pixel):", ""]
    by_name = {r["name"]: r for r in runs if r["status"] == "ok"}
    for data in DATASETS:
        for variant in VARIANTS:
            fyd, padim = by_name.get(f"{data}-{variant}-fyd"), by_name.get(f"{data}-{variant}-padim")
            if fyd and padim:
                a, b = fyd["test"]["metrics"], padim["test"]["metrics"]
                lines.append(
                    f"- {data} {variant}: {100 * (a['image_auroc'] - b['image_auroc']):+.1f} / "
                    f"{100 * (a['pixel_auroc'] - b['pixel_auroc']):+.1f}"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_datasets_root(parser)
    parser.add_argument("--work", default="/tmp/misalignbench", help="folder for the copies and runs (not the repo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moves")
    names = [c["name"] for c in CONFIGS]
    parser.add_argument("--only", nargs="+", choices=names, help="these configurations only (in the usual order)")
    parser.add_argument("--force", action="store_true", help="rerun configurations already saved")
    parser.add_argument("--analyse-only", action="store_true", help="the table from the saved results")
    parser.add_argument("--results", default=str(RESULTS), help="folder of misalign.json and misalign/")
    args = parser.parse_args(argv)
    runs_dir, summary_path = Path(args.results) / "misalign", Path(args.results) / "misalign.json"
    root, work = Path(args.datasets_root), Path(args.work)
    chosen = [c for c in CONFIGS if not args.only or c["name"] in args.only]

    copies: dict[str, Any] = {}
    if not args.analyse_only:
        for cfg in chosen:
            path = runs_dir / f"{cfg['name']}.json"
            if saved_ok(path, args.force):
                print(f"{cfg['name']}: saved, skipped", flush=True)
                continue
            data_dir = root / DATASETS[cfg["dataset"]]
            if cfg["variant"] == "misaligned":
                target = work / "data" / f"{cfg['dataset']}-misaligned" / data_dir.name
                if cfg["dataset"] not in copies:
                    print(f"{datetime.now():%H:%M:%S} building the misaligned {cfg['dataset']}", flush=True)
                    copies[cfg["dataset"]] = build_misaligned(data_dir, target, args.seed)
                data_dir = target
            print(f"{datetime.now():%H:%M:%S} {cfg['name']}: running", flush=True)
            record = run_config(cfg, data_dir, work)
            if cfg["variant"] == "misaligned":
                record["misalignment"] = {k: v for k, v in copies[cfg["dataset"]].items() if k != "moves"}
            write_json(path, record)
            if record["status"] != "ok":
                print(f"{datetime.now():%H:%M:%S} {cfg['name']}: FAILED {record['error']}", flush=True)
            else:
                m = record["test"]["metrics"]
                print(
                    f"{datetime.now():%H:%M:%S} {cfg['name']}: image AUROC {f3(m.get('image_auroc'))}, pixel AUROC "
                    f"{f3(m.get('pixel_auroc'))}, AUPRO {f3(m.get('aupro'))}, fit {record['fit']['fit_seconds']:.0f} s",
                    flush=True,
                )

    runs = [json.loads((runs_dir / f"{n}.json").read_text()) for n in names if (runs_dir / f"{n}.json").exists()]
    summary = {
        "command": "python bench/bench_misalign.py",
        "date": str(date.today()),
        "seed": args.seed,
        "ranges": {"rotation_deg": MAX_ROTATION, "shift": MAX_SHIFT, "scale": MAX_SCALE},
        "environment": next((r["environment"] for r in runs if r.get("environment")), None),
        "runs": runs,
        "missing": [n for n in names if n not in {r["name"] for r in runs if r.get("status") == "ok"}],
    }
    finish_summary(summary_path, summary, markdown(runs))


if __name__ == "__main__":
    main()
