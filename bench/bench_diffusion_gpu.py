"""The GPU recipe for DDAD and GLAD: the papers' settings, a fixed wall-clock training time, one GPU.

DDAD and GLAD are trained in pixel space with noise prediction (``space="pixel"``,
``prediction="epsilon"``, not the CPU defaults' feature space) at 256 px with the paper's UNet
(``unet="ddad"``, base 64 channels, attention at the two lowest resolutions), on every training
step (``max_train_timestep=None``), batch 32, for ``--minutes`` of training each (the papers
train thousands of epochs; this is what fits a short loan of a GPU), then tested on the
category's test split. ``--all-methods`` also fits and tests every method at its defaults on the
bundled example on the same device, to show that each runs there. One JSON with the GPU's name
goes to ``bench/results/diffusion_gpu.json``.

    python bench/bench_diffusion_gpu.py                        # cuda, mvtec_bottle, 4 minutes each
    python bench/bench_diffusion_gpu.py --minutes 2 --all-methods
    python bench/bench_diffusion_gpu.py --device cpu --smoke   # checks the script itself in a minute
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from common import add_datasets_root, environment, finite_or_none, write_json

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"mvtec_bottle": "mvtec_bottle/bottle", "mtd": "mtd/magnetic_tile"}
EXAMPLE = REPO / "examples" / "bottle_small"
#: The papers' settings (DDAD: pixel space, noise prediction, 256 px, its UNet, blur 4, the s8 + s16
#: features; GLAD on the same UNet).
PAPER = {
    "space": "pixel",
    "prediction": "epsilon",
    "ema_decay": 0.999,
    "image_size": 256,
    "unet": "ddad",
    "max_train_timestep": None,
    "blur_sigma": 4.0,
    "layers": ("s8", "s16"),
    "batch_size": 32,
    "epochs": 100000,
}
PAPER_ONLY = {"ddad": {"da_images": None}, "glad": {}}
#: A few seconds of everything on a CPU, to check the script.
SMOKE = {
    "space": "pixel",
    "prediction": "epsilon",
    "image_size": 32,
    "unet": "tiny",
    "steps": 2,
    "batch_size": 8,
    "epochs": 100000,
}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("bench_diffusion_gpu: --device cuda, but torch sees no CUDA GPU (use --device cpu --smoke here)")
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def fit_and_test(name: str, method: str, data: Path, work: Path, device: str, params: dict[str, Any]) -> dict[str, Any]:
    """Fit ``method`` with ``params`` on ``data``, test it; the record (or the error)."""
    from defectscope.runs import evaluate_run, fit_run

    run = work / name
    record: dict[str, Any] = {"name": name, "method": method, "data": str(data), "params": params}
    try:
        start = time.perf_counter()
        fitted = fit_run(data, run, method=method, params=params, device=device, overwrite=True)
        record["fit_s"] = round(time.perf_counter() - start, 1)
        info = fitted.detector.fit_info
        record["training"] = info.get("training")
        record["train_steps"] = info.get("train_steps")
        start = time.perf_counter()
        result = evaluate_run(
            run, data, out=run / "test", overlays=False, pixel_resolution="square", device=device, overwrite=True
        )
        (part,) = result.parts
        record["test_s"] = round(time.perf_counter() - start, 1)
        record["images_per_second"] = part.images_per_second
        record["metrics"] = {k: finite_or_none(v) for k, v in part.metrics.items()}
        record["status"] = "ok"
    except Exception as exc:  # one failed configuration is recorded and the next goes on
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
    m = record.get("metrics", {})
    print(
        f"{datetime.now():%H:%M:%S} {name}: {record['status']} "
        f"image AUROC {m.get('image_auroc')}, pixel AUROC {m.get('pixel_auroc')} {record.get('error', '')}",
        flush=True,
    )
    return record


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_datasets_root(parser)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mvtec_bottle")
    parser.add_argument("--device", default="cuda", help="torch device (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training minutes per method (default: 4)")
    parser.add_argument("--all-methods", action="store_true", help="also fit + test every method on the example")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, to check the script on a CPU")
    parser.add_argument("--work", default="/tmp/diffusion_gpu", help="folder of the run folders (not the repo)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "diffusion_gpu.json"))
    args = parser.parse_args(argv)
    gpu = device_name(args.device)
    data = Path(args.datasets_root) / DATASETS[args.dataset]
    if not data.is_dir():
        sys.exit(f"bench_diffusion_gpu: {data}: no such dataset folder (see --datasets-root)")
    work = Path(args.work)
    base = SMOKE if args.smoke else PAPER
    runs = []
    for method in ("ddad", "glad"):
        params = {**base, **({} if args.smoke else PAPER_ONLY[method]), "time_budget": args.minutes * 60}
        runs.append(fit_and_test(f"{args.dataset}-{method}", method, data, work, args.device, params))
    if args.all_methods:
        from defectscope.methods import METHODS

        for method in sorted(METHODS):
            small = {"time_budget": 60.0} if method in ("ddad", "glad") else {}
            runs.append(fit_and_test(f"example-{method}", method, EXAMPLE, work, args.device, small))
    write_json(
        Path(args.out),
        {
            "command": "python bench/bench_diffusion_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": str(date.today()),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": args.device,
            "gpu": gpu,
            "environment": environment(),
            "minutes_per_method": args.minutes,
            "runs": runs,
        },
    )
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
