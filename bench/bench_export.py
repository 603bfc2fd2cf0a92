"""Engines on MVTec bottle: images/s model-only and end to end, peak RSS and accuracy, per method and engine.

Each row is PatchCore or PaDiM (efficientnet_lite0, 256 px, fitted on bottle's good images) under one engine:
torch, onnxruntime (fp32), onnxruntime-int8 or openvino. It is measured twice, each time in its own
subprocess, so the peak RSS (``ru_maxrss``) is that configuration's alone:

- ``model``: the test images decoded once into memory, then ``Detector.predict`` on batches of 16;
- ``e2e``: ``evaluate_run(RUN, DATA, overlays=False)``, what ``defectscope test RUN --no-overlays --engine E``
  runs: decode, resize, batching, predict, records, metrics and the result files. Images/s as the test
  reports it (its scoring loop, decode included) and over the whole call; image and pixel AUROC of the test.

Every figure is the best of ``--repeats`` passes after a first (cold) pass, which is recorded too: the
machine may be shared. The engine's setup (loading or exporting the graph) is timed on its own. An
engine that cannot run here is recorded as unavailable with its one-line reason. One JSON per
measurement goes to ``bench/results/export/`` (a rerun skips those saved as ok unless ``--force``), the
table to ``bench/results/export.json`` (``--tag T``: ``export/T/`` and ``export-T.json``, e.g. for a run
with other allocator settings). Runs missing from ``--work`` are fitted there first.

    python bench/bench_export.py
    python bench/bench_export.py --run patchcore=/tmp/x/pc_bottle --run padim=/tmp/x/padim_bottle
    python bench/bench_export.py --engines torch --methods patchcore --force
    python bench/bench_export.py --analyse-only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from common import add_datasets_root, environment, finite_or_none, saved_ok, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RUNS_DIR = RESULTS / "export"
SUMMARY = RESULTS / "export.json"
CLI = str(Path(sys.executable).with_name("defectscope"))
DATA = "mvtec_bottle/bottle"
METHODS = ("patchcore", "padim")
#: Row name -> (engine, int8).
ENGINES: dict[str, tuple[str, bool]] = {
    "torch": ("torch", False),
    "onnxruntime": ("onnxruntime", False),
    "onnxruntime-int8": ("onnxruntime", True),
    "openvino": ("openvino", False),
}
MODES = ("model", "e2e")
BATCH = 16


# -- one measurement, in its own process -----------------------------------------------------------------
#: Settings read from the environment that change the figures (glibc's allocator keeps or returns large blocks).
SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")


def _versions() -> dict[str, str | None]:
    """Versions of the engines' packages (None where not installed) and the settings in :data:`SETTINGS`."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {name: os.environ.get(name) for name in SETTINGS}
    for name in ("onnx", "onnxruntime", "openvino", "faiss-cpu", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _passes(step: Any, repeats: int) -> dict[str, Any]:
    """A cold pass of ``step`` then ``repeats`` more: the cold figures and the best pass (wall, CPU)."""
    times = []
    for _ in range(repeats + 1):
        cpu, start = _cpu_seconds(), time.perf_counter()
        extra = step()
        times.append((time.perf_counter() - start, _cpu_seconds() - cpu, extra))
    best = min(times[1:] or times, key=lambda t: t[0])
    return {"cold": times[0], "best": best, "walls": [round(t[0], 3) for t in times]}


def _use_engine(detector: Any, engine: str, int8: bool, run: str) -> str | None:
    """``detector`` predicting with ``engine``; the engine's note (an in-memory export), if any."""
    from defectscope import engines

    choice = getattr(engines, "EngineChoice", None)
    if choice is None:  # the plain signature: use_engine(detector, name, int8=...)
        return engines.use_engine(detector, engine, int8=int8)
    return engines.use_engine(detector, choice(engine, int8=int8), run)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One (run, engine, mode) measurement; runs in a child process (``--child``)."""
    import defectscope  # noqa: F401  (sets the OpenMP wait policy before torch is loaded)
    from defectscope.data.sources import labelled_samples
    from defectscope.errors import DefectscopeError
    from defectscope.methods import load

    run, data, repeats = spec["run"], spec["data"], spec["repeats"]
    engine, int8 = ENGINES[spec["engine"]]
    record: dict[str, Any] = {"environment": {**environment(), **_versions()}}
    detector = load(run)
    start = time.perf_counter()
    try:
        record["engine_note"] = _use_engine(detector, engine, int8, run)
    except (DefectscopeError, ImportError, TypeError, ValueError) as exc:  # not there yet, or not for this method
        return {**record, "status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"}
    record["engine_setup_s"] = round(time.perf_counter() - start, 3)
    record["engine_name"] = getattr(detector, "engine_name", engine)
    samples = labelled_samples(Path(data), None, False)
    n = len(samples)
    if spec["mode"] == "model":
        import torch

        from defectscope.geometry.sources import open_sample

        views = [open_sample(s, detector.geometry, detector.image_size).views for s in samples]
        images = torch.cat([v.get(0, len(v)) for v in views])
        del views

        def step() -> None:
            for i in range(0, len(images), BATCH):
                detector.predict(images[i : i + BATCH])

        timed = _passes(step, repeats)
        wall, cpu, _ = timed["best"]
        record["model"] = {
            "n_images": len(images),
            "batch_size": BATCH,
            "images_per_second": round(len(images) / wall, 2),
            "cold_images_per_second": round(len(images) / timed["cold"][0], 2),
            "cpu_ms_per_image": round(1e3 * cpu / len(images), 2),
            "pass_walls_s": timed["walls"],
        }
    else:
        import tempfile

        from defectscope.runs import evaluate_run

        with tempfile.TemporaryDirectory(prefix="exportbench-") as tmp:

            def step() -> Any:
                return evaluate_run(
                    run, data, out=Path(tmp) / "test", overlays=False, overwrite=True, detector=detector
                )

            timed = _passes(step, repeats)
        wall, cpu, result = timed["best"]
        part = result.parts[0]
        record["e2e"] = {
            "n_images": n,
            "images_per_second": round(part.images_per_second, 2),
            "cold_images_per_second": round(timed["cold"][2].parts[0].images_per_second, 2),
            "call_images_per_second": round(n / wall, 2),
            "cpu_ms_per_image": round(1e3 * cpu / n, 2),
            "pass_walls_s": timed["walls"],
            "metrics": {k: finite_or_none(v) for k, v in part.metrics.items()},
            "n_errors": part.n_errors,
            "scores": [finite_or_none(r.score) for r in part.records],
            "verdicts": [r.verdict for r in part.records],
        }
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["status"] = "ok"
    return record


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter; its record, or the error it ended with."""
    env = dict(os.environ, DEFECTSCOPE_NO_PROGRESS="1")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    record: dict[str, Any]
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=REPO,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            record = json.loads(lines[-1])
        else:
            tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
            record = {"status": "error", "error": f"exit {proc.returncode}: {tail}"}
    except subprocess.TimeoutExpired:
        record = {"status": "error", "error": f"more than {timeout:.0f} s"}
    return {
        **spec,
        **record,
        "process_wall_s": round(time.perf_counter() - start, 2),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# -- runs, rows, table ----------------------------------------------------------------------------------
def ensure_run(method: str, data: Path, work: Path) -> Path:
    """``work/bottle-METHOD``, fitted with ``defectscope fit`` when it is not there yet."""
    run = work / f"bottle-{method}"
    if not (run / "config.json").exists():
        print(f"{datetime.now():%H:%M:%S} fitting {run}", flush=True)
        cmd = [CLI, "fit", str(data), "--method", method, "--backbone", "efficientnet_lite0", "--image-size", "256"]
        subprocess.run(
            [*cmd, "--out", str(run), "--overwrite"], check=True, env=dict(os.environ, DEFECTSCOPE_NO_PROGRESS="1")
        )
    return run


def export_files(run: Path) -> dict[str, float]:
    """``defectscope export RUN`` and ``--int8`` (replacing earlier exports): the engines then load files, as a
    deployment does, instead of exporting in memory; returns the seconds each export took (parity check included)."""
    seconds = {}
    for extra in ([], ["--int8"]):
        start = time.perf_counter()
        subprocess.run(
            [CLI, "export", str(run), "--overwrite", *extra],
            check=True,
            env=dict(os.environ, DEFECTSCOPE_NO_PROGRESS="1"),
        )
        seconds["int8" if extra else "fp32"] = round(time.perf_counter() - start, 1)
    return seconds


def rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, engine): model and end-to-end figures, accuracy, and the scores' drift from torch."""
    by = {(r["method"], r["engine"], r["mode"]): r for r in records}
    out = []
    for method in METHODS:
        torch_e2e = by.get((method, "torch", "e2e"), {}).get("e2e")
        for engine in ENGINES:
            model, e2e = by.get((method, engine, "model")), by.get((method, engine, "e2e"))
            if model is None and e2e is None:
                continue
            row: dict[str, Any] = {"method": method, "engine": engine}
            for name, rec in (("model", model), ("e2e", e2e)):
                if rec is None:
                    continue
                row[f"{name}_status"] = rec["status"]
                if rec["status"] != "ok":
                    row[f"{name}_reason"] = rec.get("reason") or rec.get("error")
                    continue
                fig = rec[name]
                row[f"{name}_images_per_second"] = fig["images_per_second"]
                row[f"{name}_cpu_ms_per_image"] = fig["cpu_ms_per_image"]
                row[f"{name}_peak_rss_mb"] = round(rec["peak_rss_bytes"] / 2**20)
                row["engine_setup_s"] = rec.get("engine_setup_s")
            if e2e is not None and e2e["status"] == "ok":
                fig = e2e["e2e"]
                row["e2e_call_images_per_second"] = fig["call_images_per_second"]
                row["e2e_cold_images_per_second"] = fig["cold_images_per_second"]
                row["image_auroc"] = fig["metrics"].get("image_auroc")
                row["pixel_auroc"] = fig["metrics"].get("pixel_auroc")
                if torch_e2e is not None and engine != "torch":
                    pairs = [
                        (a, b)
                        for a, b in zip(fig["scores"], torch_e2e["scores"])
                        if a is not None and b is not None and b != 0
                    ]
                    row["max_score_rel_diff_vs_torch"] = max((abs(a - b) / abs(b) for a, b in pairs), default=None)
                    row["verdicts_changed_vs_torch"] = sum(
                        a != b for a, b in zip(fig["verdicts"], torch_e2e["verdicts"])
                    )
            out.append(row)
    return out


def table(summary_rows: list[dict[str, Any]]) -> str:
    def f(x: Any, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)

    lines = [
        "| method | engine | model img/s | model RSS MB | e2e img/s | e2e RSS MB | image AUROC | pixel AUROC | "
        "score drift |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary_rows:
        if r.get("model_status") != "ok" and r.get("e2e_status") != "ok":
            reason = r.get("model_reason") or r.get("e2e_reason") or ""
            lines.append(f"| {r['method']} | {r['engine']} | unavailable: {reason[:90]} | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['engine']} | {f(r.get('model_images_per_second'))} | "
            f"{f(r.get('model_peak_rss_mb'), 'd')} | {f(r.get('e2e_images_per_second'))} | "
            f"{f(r.get('e2e_peak_rss_mb'), 'd')} | {f(r.get('image_auroc'), '.4f')} | "
            f"{f(r.get('pixel_auroc'), '.4f')} | {f(r.get('max_score_rel_diff_vs_torch'), '.2e')} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_datasets_root(parser)
    parser.add_argument("--work", default="/tmp/exportbench", help="folder for fitted runs (not the repository)")
    parser.add_argument("--run", action="append", default=[], metavar="METHOD=RUN", help="use this fitted run")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the cold one (best is kept)")
    parser.add_argument("--force", action="store_true", help="rerun measurements already saved as ok")
    parser.add_argument("--analyse-only", action="store_true", help="the table from the saved results")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before one measurement is abandoned")
    parser.add_argument("--tag", help="keep these results apart: bench/results/export-TAG.json and export/TAG/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child)), allow_nan=False))
        return
    runs_dir = RUNS_DIR / args.tag if args.tag else RUNS_DIR
    summary_path = RESULTS / f"export-{args.tag}.json" if args.tag else SUMMARY
    data = Path(args.datasets_root) / DATA
    given = dict(item.split("=", 1) for item in args.run)
    export_seconds: dict[str, dict[str, float]] = {}
    if not args.analyse_only:
        for method in args.methods:
            run = Path(given[method]) if method in given else ensure_run(method, data, Path(args.work))
            if any(engine != "torch" for engine in args.engines):
                export_seconds[method] = export_files(run)
            for engine in args.engines:
                for mode in args.modes:
                    name = f"{method}-{engine}-{mode}"
                    path = runs_dir / f"{name}.json"
                    if saved_ok(path, args.force):
                        print(f"{name}: saved, skipped", flush=True)
                        continue
                    spec = {"method": method, "engine": engine, "mode": mode, "run": str(run), "data": str(data)}
                    record = run_child({**spec, "repeats": args.repeats}, args.timeout)
                    write_json(path, record)
                    fig = record.get(mode, {})
                    said = record.get("reason") or record.get("error") or f"{fig.get('images_per_second')} img/s"
                    print(f"{datetime.now():%H:%M:%S} {name}: {record['status']}: {said}", flush=True)
    records = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    command = "python bench/bench_export.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.analyse_only and summary_path.exists():  # keep the command that measured
        command = json.loads(summary_path.read_text()).get("command", command)
    summary = {
        "command": command,
        "date": str(date.today()),
        "environment": next((r["environment"] for r in records if r.get("environment")), None),
        "data": DATA,
        "export_seconds": export_seconds,
        "rows": rows(records),
        "runs": records,
    }
    write_json(summary_path, summary)
    print(table(summary["rows"]))
    print(f"written: {summary_path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
