"""Load test of ``defectscope serve`` on loopback: latency percentiles and images/s at 1, 4 and 16 clients.

The server runs as a subprocess (``defectscope serve RUN --port 0``, SQLite log in a temporary
data folder, bearer token); each client is a thread with its own keep-alive HTTP connection that
posts the test images of the run's data one after another as raw ``image/*`` bodies. Every level
starts with a warm-up (not measured) and then sends ``--requests`` requests. The reference is
``defectscope test RUN --no-overlays`` on the same images (``evaluate_run`` in this process, the
server idle): its images/s, measured just before and just after each level, so that each ratio
compares figures taken under the same load (the machine may be shared).

    python bench/bench_serve.py                       # fits PatchCore (defaults, 256 px) on examples/bottle_small
    python bench/bench_serve.py --run runs/bottle     # a fitted run; images: the test split it was fitted on
    python bench/bench_serve.py --run runs/bottle --data ../shared/datasets/mvtec_bottle/bottle

Writes bench/results/serve.json and prints a markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import common

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "serve.json"
EXAMPLE = REPO / "examples" / "bottle_small"
TOKEN = "bench-token-0123456789abcdef"
#: The issue's bar: served throughput at 16 clients against ``test --no-overlays``, and the tail.
TARGET_RATIO = 0.8
TARGET_TAIL = 3.0


def environment() -> dict[str, Any]:
    """The machine (:func:`common.environment`) and its load average as the bench starts."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {**common.environment(), "load_average_at_start": [round(x, 2) for x in load] if load else None}


# -- the server --------------------------------------------------------------------------------------
@contextmanager
def server(run: Path, folder: Path, max_batch: int | None) -> Iterator[str]:
    """``defectscope serve RUN`` on a free loopback port until the block ends; yields its base URL."""
    from defectscope.serve.process import ServeStartError, start_serve

    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    argv = [str(run), "--host", "127.0.0.1", "--port", "0", "--data-dir", str(folder / "data")]
    argv += ["--token-file", str(token_file)] + (["--max-batch", str(max_batch)] if max_batch else [])
    try:
        child = start_serve(argv, timeout=120)
    except ServeStartError as exc:
        raise SystemExit(str(exc)) from None
    try:
        yield child.url
    finally:
        child.stop()
        for line in child.stderr:
            if "serving" not in line:
                print(f"server: {line}", file=sys.stderr)


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's ``defectscope_batch_size`` histogram, over all models."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("defectscope_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("defectscope_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def load(url: str, model: str, payloads: list[tuple[str, bytes]], clients: int, requests: int) -> list[float]:
    """``requests`` inspections from ``clients`` threads; the latency of each (seconds). Any non-200 stops."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    endpoint = f"{url}/v1/models/{model}/inspect"
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not failures:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = payloads[i % len(payloads)]
                kind = "image/png" if name.lower().endswith(".png") else "application/octet-stream"
                begin = time.perf_counter()
                response = http.post(
                    endpoint, content=data, params={"filename": name}, headers={**headers, "Content-Type": kind}
                )
                elapsed = time.perf_counter() - begin
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:300]}")
                    return
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"request failed: {failures[0]}")
    return latencies


# -- the reference -----------------------------------------------------------------------------------
def reference_throughput(run: Path, data: Path | None, repeats: int, warm_up: bool = False) -> list[float]:
    """images/s of ``defectscope test RUN [DATA] --no-overlays`` (in process), ``repeats`` times.

    ``warm_up`` first runs it once unmeasured (torch start-up, the file cache).
    """
    from defectscope.runs import evaluate_run

    rates = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-test-") as out:
        for i in range(repeats + warm_up):
            result = evaluate_run(run, data, out=out, overlays=False, overwrite=True)
            if i >= warm_up:
                rates.append(sum(p.images_per_second * len(p.records) for p in result.parts) / len(result.records))
    return rates


def posted_images(run: Path, data: Path | None) -> list[Path]:
    """The images ``test`` scores: the test split of ``data``, or of the data the run was fitted on."""
    from defectscope.methods import load as load_model
    from defectscope.runs import run_info
    from defectscope.runs.evaluation import dirs_to_test

    folders = dirs_to_test(data, None, None, run_info(load_model(run)))
    return sorted(
        p for folder in folders for p in (folder / "test").rglob("*") if p.is_file() and not p.name.startswith(".")
    )


def fit_default(folder: Path) -> Path:
    """PatchCore with its defaults (efficientnet_lite0, 256 px) on the bundled example."""
    from defectscope.runs import fit_run

    run = folder / "bottle_small"
    fit_run(EXAMPLE, run)
    return run


# -- report ------------------------------------------------------------------------------------------
def percentiles(latencies: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000.0
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)}


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    ref = result["test_no_overlays"]
    lines = [
        "## Inspection service: `defectscope serve` under load",
        "",
        f"Command: `python bench/bench_serve.py{result['command_args']}`. Run `{result['run_name']}` "
        f"({result['method']}, {result['backbone']}, {result['image_size']} px), {result['n_images']} test images "
        f"posted in turn as raw image bodies over loopback HTTP with a bearer token, SQLite log; "
        f"{result['requests']} measured requests per level after {result['warmup']} warm-up requests; "
        f"server batch cap {result['max_batch']}, 5 ms batch wait. Machine: {env['cpu']}, {env['cores']} cores "
        f"(**shared** with other work: load average {(env['load_average_at_start'] or ['?'])[0]} at the start), "
        f"torch {env['torch']} CPU; the clients run on the same cores as the server. "
        f"Date {result['date']}.",
        "",
        "| clients | p50 ms | p95 ms | p99 ms | p99 / p50 | images/s | mean batch | `test` img/s | served / `test` |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in result["levels"]:
        lines.append(
            f"| {level['clients']} | {level['p50_ms']:.0f} | {level['p95_ms']:.0f} | {level['p99_ms']:.0f} | "
            f"{level['tail_ratio']:.2f} | {level['images_per_second']:.1f} | {level['mean_batch']:.1f} | "
            f"{level['test_images_per_second']:.1f} | {level['ratio_to_test']:.0%} |"
        )
    verdict = result["verdict"]
    lines += [
        "",
        f"`test` images/s: `defectscope test RUN --no-overlays` on the same images, in the bench process, "
        f"{result['repeats']} runs just before and {result['repeats']} just after each level (median; the server "
        f"idle meanwhile), so each ratio compares figures taken under the same machine load "
        f"(all runs: median {ref['images_per_second']:.1f}, range {min(ref['runs']):.1f} to {max(ref['runs']):.1f}). "
        f"At {verdict['clients']} clients the service reaches {verdict['ratio_16']:.0%} of it (target >= "
        f"{TARGET_RATIO:.0%}: {'met' if verdict['ratio_met'] else 'NOT met'}) with p99 = {verdict['tail_16']:.2f} x "
        f"p50 (target <= {TARGET_TAIL:.0f}: {'met' if verdict['tail_met'] else 'NOT met'}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="fitted run folder (default: fit PatchCore on examples/bottle_small)")
    parser.add_argument("--data", type=Path, help="category folder whose test split is posted (default: the run's)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=160, help="measured requests per level (default: 160)")
    parser.add_argument("--warmup", type=int, default=16, help="unmeasured requests before each level")
    parser.add_argument("--repeats", type=int, default=2, help="`test` runs before and after each level (default: 2)")
    parser.add_argument("--max-batch", type=int, help="server --max-batch (default: the run's batch size)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    os.environ.setdefault("DEFECTSCOPE_NO_PROGRESS", "1")

    from defectscope.methods import load as load_model

    env = environment()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        run = args.run or fit_default(folder)
        detector = load_model(run)
        images = posted_images(run, args.data)
        payloads = [(p.name, p.read_bytes()) for p in images]
        reference_throughput(run, args.data, 0, warm_up=True)
        references: list[float] = []
        levels = []
        max_batch = args.max_batch or detector.batch_size
        with server(run, folder, args.max_batch) as url:
            model = httpx.get(f"{url}/healthz", timeout=10).json()["models"][0]
            for clients in args.clients:
                load(url, model, payloads, clients, args.warmup)
                before = reference_throughput(run, args.data, args.repeats)  # the server idle meanwhile
                batch_sum, batch_count = batch_stats(url)
                begin = time.perf_counter()
                latencies = load(url, model, payloads, clients, args.requests)
                wall = time.perf_counter() - begin
                after_sum, after_count = batch_stats(url)
                after = reference_throughput(run, args.data, args.repeats)
                references += before + after
                level = {"clients": clients, "requests": len(latencies), **percentiles(latencies)}
                level["images_per_second"] = round(len(latencies) / wall, 2)
                level["tail_ratio"] = round(level["p99_ms"] / level["p50_ms"], 2)
                level["mean_batch"] = round((after_sum - batch_sum) / max(after_count - batch_count, 1), 2)
                level["test_images_per_second"] = round(statistics.median(before + after), 2)
                level["ratio_to_test"] = round(level["images_per_second"] / level["test_images_per_second"], 3)
                levels.append(level)
                print(f"{clients:>3} clients: {level}", file=sys.stderr)
    top = max(levels, key=lambda lv: lv["clients"])
    params = detector.get_params()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).date().isoformat(),
        "command_args": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "run": str(args.run) if args.run else "PatchCore defaults on examples/bottle_small (fitted by the bench)",
        "run_name": Path(run).name,
        "method": detector.name,
        "backbone": params.get("backbone"),
        "image_size": detector.image_size,
        "n_images": len(images),
        "requests": args.requests,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "max_batch": max_batch,
        "environment": env,
        "levels": levels,
        "test_no_overlays": {
            "images_per_second": round(statistics.median(references), 2),
            "runs": [round(r, 2) for r in references],
        },
        "verdict": {
            "clients": top["clients"],
            "ratio_16": top["ratio_to_test"],
            "ratio_met": top["ratio_to_test"] >= TARGET_RATIO,
            "tail_16": top["tail_ratio"],
            "tail_met": top["tail_ratio"] <= TARGET_TAIL,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(markdown(result))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
