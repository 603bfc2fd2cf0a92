"""Fit + test benchmark of PatchCore on the shared datasets; writes rows for BENCHMARKS.md.

Each configuration runs in its own process so its peak resident memory is measured alone.

    python bench/bench_patchcore.py                      # all datasets x backbones
    python bench/bench_patchcore.py --datasets mvtec_bottle --backbones efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"mvtec_bottle": "mvtec_bottle/bottle", "mtd": "mtd/magnetic_tile"}
BACKBONES = ["mobilenet_v2", "efficientnet_lite0"]


def run_one(data_dir: Path, backbone: str, image_size: int, params: dict) -> dict:
    """Fit and test one configuration in this process; return its figures."""
    from defectscope import PatchCore
    from defectscope.data import mvtec_samples
    from defectscope.evaluate import evaluate

    start = time.perf_counter()
    det = PatchCore(backbone=backbone, image_size=image_size, **params).fit(data_dir)
    fit_s = time.perf_counter() - start
    result = evaluate(det, mvtec_samples(data_dir, "test"))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"fit_s": fit_s, "img_per_s": result.images_per_second, "peak_rss_gb": peak_kb / 1024**2,
            "bank": int(det.memory_bank.shape[0]), "dim": int(det.memory_bank.shape[1]), **result.metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets-root", default=os.environ.get("DEFECTSCOPE_DATASETS", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="extra PatchCore parameter")
    parser.add_argument("--one", nargs=2, metavar=("DATA_DIR", "BACKBONE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), args.one[1], args.image_size, params)))
        return
    rows = []
    for name in args.datasets:
        for backbone in args.backbones:
            cmd = [sys.executable, __file__, "--one", str(Path(args.datasets_root) / DATASETS[name]), backbone,
                   "--image-size", str(args.image_size)] + sum((["--set", s] for s in args.set), [])
            env = dict(os.environ, DEFECTSCOPE_NO_PROGRESS="1")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(f"| {name} | PatchCore, {backbone} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
                        f"{r['aupro']:.3f} | {r['fit_s']:.1f} | {r['img_per_s']:.1f} | {r['peak_rss_gb']:.2f} GB |")
            print(rows[-1], f"(bank {r['bank']} x {r['dim']})", flush=True)
    print(f"\ncommand: python bench/bench_patchcore.py {' '.join(sys.argv[1:])}\nmachine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}\ndate: {date.today()}")


if __name__ == "__main__":
    main()
