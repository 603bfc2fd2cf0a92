"""``predict --engine ray`` against the local engine: images/s on one machine, and the records compared.

Fits PaDiM (defaults, 256 px) on a dataset's good images once, then scores its whole test split
(mtd: 582 images) with the local engine (torch, all cores) and with Ray on a local runtime
(``--workers`` actors of ``--threads`` torch threads each; the runtime's start is timed apart).
Scores must match to 1e-6 relative. ``--coverage`` also fits PatchCore (defaults) in one process and
with the composable coreset on the Ray workers, and measures how far a seeded sample of 20,000
training patches lies from each bank (largest and mean distance). Writes ``bench/results/ray.json``.

    python bench/bench_ray.py                      # mtd, 2 workers x 1 thread
    python bench/bench_ray.py --dataset mvtec_bottle --workers 1 --threads 2
    python bench/bench_ray.py --inputs all         # train + test images: the fixed cost over a longer job
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

from common import add_datasets_root, environment, write_json

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"mvtec_bottle": "mvtec_bottle/bottle", "mtd": "mtd/magnetic_tile"}


def coverage_figures(data: Path, work: Path, workers: int, threads: int) -> dict[str, Any]:
    """PatchCore fitted in one process and on the Ray workers: fit time, bank size, coverage of sampled patches."""
    import torch

    from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
    from defectscope.distributed import RayShards
    from defectscope.nn.coreset import coverage
    from defectscope.runs import fit_run

    out: dict[str, Any] = {}
    banks = {}
    for name, shards in (("single", None), ("ray", RayShards(workers, threads))):
        start = time.perf_counter()
        fitted = fit_run(data, work / f"patchcore-{name}", method="patchcore", shards=shards, overwrite=True)
        banks[name] = fitted.detector.index.bank
        out[name] = {"fit_s": round(time.perf_counter() - start, 1), "bank": len(banks[name])}
        detector = fitted.detector
    samples = mvtec_samples(data, "train")
    generator = torch.Generator().manual_seed(0)
    chunks = []
    for batch in iterate_batches(ImageDataset(samples, detector.image_size), 32):
        with torch.no_grad():
            emb = detector.embed(batch["image"])
        chunks.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
    patches = torch.cat(chunks)
    sample = patches[torch.randperm(len(patches), generator=generator)[:20000]]
    for name, bank in banks.items():
        largest, mean = coverage(sample, bank)
        out[name] |= {"largest_distance": round(largest, 4), "mean_distance": round(mean, 4)}
    out["patches"] = len(patches)
    out["ray_over_single"] = {
        k: round(out["ray"][k] / out["single"][k], 4) for k in ("largest_distance", "mean_distance")
    }
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_datasets_root(parser)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mtd")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--coverage", action="store_true", help="also PatchCore's composable coreset coverage")
    parser.add_argument("--work", default="/tmp/raybench", help="folder of the run and results (not the repo)")
    parser.add_argument(
        "--inputs",
        choices=("test", "all"),
        default="test",
        help="score the test split, or the train and test splits together (a longer job; writes ray_all.json)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("DEFECTSCOPE_NO_PROGRESS", "1")
    import ray

    from defectscope.distributed import predict_ray, read_results
    from defectscope.runs import fit_run, predict_run

    data, work = Path(args.datasets_root) / DATASETS[args.dataset], Path(args.work)
    run = work / f"padim-{args.dataset}"
    if not (run / "config.json").exists():
        fit_run(data, run, method="padim", overwrite=True)
    predict_run(run, sorted((data / "train" / "good").iterdir())[:16])  # warm up the libraries
    inputs = [data] if args.inputs == "test" else [data, data / "train" / "good"]
    start = time.perf_counter()
    local = predict_run(run, inputs)
    local_s = time.perf_counter() - start
    start = time.perf_counter()
    ray.init(num_cpus=args.workers * args.threads, include_dashboard=False, log_to_driver=False)
    startup_s = time.perf_counter() - start
    out = work / "ray.jsonl"
    start = time.perf_counter()
    result = predict_ray(run, inputs, out, workers=args.workers, threads_per_worker=args.threads, overwrite=True)
    ray_s = time.perf_counter() - start
    if args.coverage:
        summary_coverage = coverage_figures(data, work, args.workers, args.threads)
    ray.shutdown()
    rows = {r["path"]: r for r in read_results(out)}
    worst = max(abs(rows[r.path]["score"] - r.score) / abs(r.score) for r in local.records)
    same_verdicts = all(rows[r.path]["verdict"] == r.verdict for r in local.records)
    n = len(local.records)
    summary = {
        "command": " ".join(["python bench/bench_ray.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": str(date.today()),
        "environment": environment(),
        "dataset": args.dataset,
        "images": n,
        "workers": args.workers,
        "threads_per_worker": args.threads,
        "local": {"seconds": round(local_s, 2), "images_per_second": round(n / local_s, 1)},
        "ray": {
            "runtime_start_s": round(startup_s, 2),
            "seconds": round(ray_s, 2),
            "images_per_second": round(len(result.scored) / ray_s, 1),
        },
        "ray_over_local": round((len(result.scored) / ray_s) / (n / local_s), 3),
        "largest_relative_score_difference": worst,
        "verdicts_identical": same_verdicts,
    }
    if args.coverage:
        summary["patchcore_coverage"] = summary_coverage
    name = "ray.json" if args.inputs == "test" else "ray_all.json"
    write_json(REPO / "bench" / "results" / name, summary)
    print(summary)


if __name__ == "__main__":
    main()
