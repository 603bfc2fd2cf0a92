"""Separate vs unified models, and unsupervised vs K labelled defects, on mvtec_bottle + mtd.

    python bench/bench_unified.py                          # DMAD: separate, unified, K = 1, 5, 10 (unified)
    python bench/bench_unified.py --method patchcore --ks  # any method: separate vs unified only

Every row is fitted in its own process. Labelled defects are taken from the test split with the
model's seed and left out of the evaluation of every row that is compared with them (the same
images are removed from the K = 0 rows too, so all rows of one K see the same test images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from common import add_datasets_root

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = {"bottle": "mvtec_bottle/bottle", "magnetic_tile": "mtd/magnetic_tile"}


def run_one(method: str, dirs: list[Path], k: int, exclude_k: int, params: dict) -> dict:
    """Fit one model on ``dirs`` (with ``k`` labelled defects per category) and test each category."""
    from defectscope.data import mvtec_samples
    from defectscope.data.sources import pick_labelled_defects
    from defectscope.evaluate import evaluate
    from defectscope.methods import METHODS

    det = METHODS[method](**params)
    defects = pick_labelled_defects(dirs, k, det.seed) if k else []
    excluded = {str(s.path) for s in pick_labelled_defects(dirs, exclude_k, det.seed)} if exclude_k else set()
    start = time.perf_counter()
    det.fit([s for d in dirs for s in mvtec_samples(d, "train")], defects=defects)
    fit_s = time.perf_counter() - start
    out = {}
    for d in dirs:
        samples = [s for s in mvtec_samples(d, "test") if str(s.path) not in excluded]
        metrics = evaluate(det, samples).metrics
        out[d.name] = {key: metrics[key] for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")}
    return {"fit_s": fit_s, "per_category": out}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_datasets_root(parser)
    parser.add_argument("--method", default="dmad")
    parser.add_argument(
        "--ks",
        nargs="*",
        type=int,
        default=[1, 5, 10],
        help="labelled defects per category for the unified semi-supervised rows (none: skip)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    params = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    dirs = [Path(args.datasets_root) / rel for rel in CATEGORIES.values()]
    if args.one:
        spec = json.loads(args.one)
        chosen = [d for d in dirs if d.name in spec["categories"]]
        print(json.dumps(run_one(args.method, chosen, spec["k"], spec["exclude_k"], params)))
        return
    top_k = max(args.ks, default=0)
    rows = [("separate", [name], 0) for name in CATEGORIES] + [("unified", list(CATEGORIES), 0)]
    rows += [("unified", list(CATEGORIES), k) for k in args.ks]
    print("| model | labelled defects per category | category | image AUROC | pixel AUROC | pixel AP | AUPRO | fit s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, names, k in rows:
        spec = json.dumps({"categories": names, "k": k, "exclude_k": top_k})
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--method",
            args.method,
            "--one",
            spec,
            "--datasets-root",
            args.datasets_root,
            *[word for s in args.set for word in ("--set", s)],
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, DEFECTSCOPE_NO_PROGRESS="1"))
        if proc.returncode != 0:
            print(f"| {kind} | {k} | {', '.join(names)} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]} |")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        for category, m in result["per_category"].items():
            print(
                f"| {kind} | {k} | {category} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | "
                f"{m['pixel_ap']:.3f} | {m['aupro']:.3f} | {result['fit_s']:.0f} |",
                flush=True,
            )
    print(
        f"\ncommand: python bench/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}\n"
        f"test images: the {top_k} labelled defects per category of the largest K are left out of every row\n"
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}\ndate: {date.today()}"
    )


if __name__ == "__main__":
    main()
