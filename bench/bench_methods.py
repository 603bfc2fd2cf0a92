"""Fit + test benchmark of the detection methods on the shared datasets; writes rows for BENCHMARKS.md.

Each configuration (method x dataset x backbone) runs in its own process so its peak resident
memory is measured alone.

    python bench/bench_methods.py                        # all methods x datasets x backbones
    python bench/bench_methods.py --methods padim --datasets mvtec_bottle --backbones efficientnet_lite0
    python bench/bench_methods.py --methods spade --set num_image_neighbors=20
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from common import add_datasets_root

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
DATASETS = {"mvtec_bottle": "mvtec_bottle/bottle", "mtd": "mtd/magnetic_tile"}
BACKBONES = ["mobilenet_v2", "efficientnet_lite0"]
FEATURE_METHODS = ["patchcore", "padim", "spade"]  # the default set: no training, minutes per row


def method_params(method: str, params: dict) -> dict:
    """The ``--set`` parameters that ``method``'s constructor takes."""
    from defectscope.methods import METHODS

    accepted = inspect.signature(METHODS[method].__init__).parameters
    return {k: v for k, v in params.items() if k in accepted}


def run_one(method: str, data_dir: Path, backbone: str, image_size: int | None, params: dict) -> dict:
    """Fit and test one configuration in this process; return its figures."""
    from defectscope.data import mvtec_samples
    from defectscope.evaluate import evaluate
    from defectscope.methods import METHODS

    given = {"backbone": backbone, **({"image_size": image_size} if image_size else {}), **params}
    start = time.perf_counter()
    det = METHODS[method](**method_params(method, given)).fit(data_dir)
    fit_s = time.perf_counter() - start
    result = evaluate(det, mvtec_samples(data_dir, "test"))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as folder:
        model_bytes = sum(f.stat().st_size for f in det.save(folder).iterdir())
    training = det.fit_info.get("training") or {}
    return {
        "fit_s": fit_s,
        "img_per_s": result.images_per_second,
        "peak_rss_gb": peak_kb / 1024**2,
        "model_mb": model_bytes / 1024**2,
        "image_size": det.image_size,
        "epochs": training.get("epochs_done"),
        **result.metrics,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_datasets_root(parser)
    from defectscope.methods import METHODS

    parser.add_argument(
        "--methods",
        nargs="+",
        default=FEATURE_METHODS,
        choices=sorted(METHODS),
        help="methods to run (default: the feature-based ones; trained methods take minutes each)",
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--image-size", type=int, help="input size (default: each method's own default)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra method parameter, given to every method that has it",
    )
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "DATA_DIR", "BACKBONE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    params = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.one:
        print(json.dumps(run_one(args.one[0], Path(args.one[1]), args.one[2], args.image_size, params)))
        return
    unused = set(params) - {k for m in args.methods for k in method_params(m, params)}
    if unused:
        parser.error(f"--set {', '.join(sorted(unused))}: no benchmarked method has such a parameter")

    for method in args.methods:
        with_backbone = "backbone" in method_params(method, {"backbone": None})
        for name in args.datasets:
            for backbone in args.backbones if with_backbone else ["-"]:
                cmd = (
                    [
                        sys.executable,
                        str(SCRIPT),
                        "--one",
                        method,
                        str(Path(args.datasets_root) / DATASETS[name]),
                        backbone,
                    ]
                    + (["--image-size", str(args.image_size)] if args.image_size else [])
                    + [word for s in args.set for word in ("--set", s)]
                )
                env = dict(os.environ, DEFECTSCOPE_NO_PROGRESS="1")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                label = METHODS[method].__name__ + (f", {backbone}" if with_backbone else "")
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"| {name} | {label} | failed: {tail} |", flush=True)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                trained = f", {r['epochs']} epochs" if r.get("epochs") else ""
                print(
                    f"| {name} | {label} ({r['image_size']} px{trained}) | {r['image_auroc']:.3f} | "
                    f"{r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['fit_s']:.1f} | {r['img_per_s']:.1f} | "
                    f"{r['peak_rss_gb']:.2f} GB | {r['model_mb']:.1f} MB |",
                    flush=True,
                )
    print(
        f"\ncommand: python bench/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}\n"
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}\ndate: {date.today()}"
    )


if __name__ == "__main__":
    main()
