"""Input geometry on real data: square resize, keep-aspect and tiles, measured through the CLI.

Every configuration is ``defectscope fit`` then ``defectscope test --pixel-resolution native``
(pixel metrics against the masks at their own size), each command under ``/usr/bin/time -v`` for
its peak RSS; models fitted with the square resize are also tested once with
``--pixel-resolution square --no-overlays`` (the papers' protocol). Image AUROC per defect type
(good against that type) comes from predictions.csv. One JSON per configuration is written to
``bench/results/geometry/`` as soon as it finishes (a rerun skips the finished ones unless
``--force``); run folders go to ``--work`` (default /tmp/geobench).

The camera check builds one 8000 x 2000 px image from a repeated mtd good image with a thin
3 px dark scratch and times ``defectscope predict`` on it with the mtd PaDiM tiles model (with
and without ``--heatmaps``): seconds and peak RSS for one large image.

    python bench/bench_geometry.py                        # every configuration, the camera check, the table
    python bench/bench_geometry.py --only mtd-padim-tiles camera
    python bench/bench_geometry.py --analyse-only         # the table from the saved results
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from common import add_datasets_root, environment, f3, finish_summary, finite_or_none, saved_ok, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RUNS_DIR = RESULTS / "geometry"
SUMMARY = RESULTS / "geometry.json"
CLI = str(Path(sys.executable).with_name("defectscope"))
DATASETS = {"mtd": "mtd/magnetic_tile", "mvtec_bottle": "mvtec_bottle/bottle"}
#: Thin or small defect types, shown in their own columns.
THIN = {"mtd": ["crack", "fray"], "mvtec_bottle": ["broken_small"]}
#: Error text that suggests a file of the tree was caught mid-edit: the command is retried.
TRANSIENT = ("ImportError", "ModuleNotFoundError", "SyntaxError", "IndentationError", "circular import")

SQUARE = {"label": "square 256", "args": []}
KEEP = {"label": "keep-aspect 256", "args": ["--resize", "keep-aspect"]}
TILES = {"label": "tiles 256, native", "args": ["--tile", "256"]}
TILES_HALF = {"label": "tiles 256, scale 0.5", "args": ["--tile", "256", "--scale", "0.5"]}
#: PatchCore's bank grows with the tiles (mtd: 3.6 tiles per image): a smaller coreset keeps its
#: fit time near the square model's (the bank ends up about as large).
SMALL_CORESET = ["--set", "coreset_ratio=0.02"]


def config(dataset: str, method: str, geometry: dict[str, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
    name = (
        f"{'bottle' if dataset == 'mvtec_bottle' else dataset}-{method}-"
        + {
            "square 256": "square",
            "keep-aspect 256": "keep",
            "tiles 256, native": "tiles",
            "tiles 256, scale 0.5": "tiles-half",
        }[geometry["label"]]
    )
    return {
        "name": name,
        "dataset": dataset,
        "method": method,
        "geometry": geometry["label"],
        "fit_args": ["--method", method, *geometry["args"], *extra],
        "extra": list(extra),
        "square_protocol": geometry is SQUARE,
    }


#: Run order: the cheap ones first, the mtd PaDiM tiles model before the camera check that uses it,
#: the 16-tiles-per-image bottle model last.
CONFIGS = [
    config("mtd", "padim", SQUARE),
    config("mtd", "padim", KEEP),
    config("mtd", "padim", TILES),
    {"name": "camera"},
    config("mvtec_bottle", "padim", SQUARE),
    config("mvtec_bottle", "padim", KEEP),
    config("mvtec_bottle", "padim", TILES_HALF),
    config("mvtec_bottle", "patchcore", SQUARE),
    config("mvtec_bottle", "patchcore", KEEP),
    config("mvtec_bottle", "patchcore", TILES_HALF),
    config("mtd", "patchcore", SQUARE),
    config("mtd", "patchcore", KEEP),
    config("mtd", "patchcore", TILES, SMALL_CORESET),
    config("mvtec_bottle", "padim", TILES),
]
CAMERA_RUN = "mtd-padim-tiles"
CAMERA_SIZE = (8000, 2000)


# -- one timed command ---------------------------------------------------------------------------------
def time_field(report: str, pattern: str) -> float | None:
    """One figure of ``/usr/bin/time -v``'s report."""
    m = re.search(pattern, report)
    return float(m.group(1)) if m else None


def timed(cmd: list[str], log: Path, timeout: float, retries: int = 2) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v``: exit status, wall seconds, peak RSS, stdout; retried when
    the error looks like a file of the tree caught mid-edit."""
    env = dict(os.environ, DEFECTSCOPE_NO_PROGRESS="1")
    for attempt in range(retries + 1):
        timefile = log.with_name(log.name + ".time")
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                ["/usr/bin/time", "-v", "-o", str(timefile), *cmd],
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
            )
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = -1, str(exc.stdout or ""), f"TimeoutExpired: more than {timeout:.0f} s\n{exc.stderr or ''}"
        wall = time.perf_counter() - start
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}\n")
        report = timefile.read_text() if timefile.exists() else ""
        rss = time_field(report, r"Maximum resident set size \(kbytes\): (\d+)")
        user = time_field(report, r"User time \(seconds\): ([\d.]+)")
        system = time_field(report, r"System time \(seconds\): ([\d.]+)")
        result = {
            "cmd": cmd,
            "rc": rc,
            "wall_s": wall,
            "peak_rss_bytes": None if rss is None else int(rss) * 1024,
            "cpu_s": None if user is None or system is None else user + system,
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "stdout": out,
            "attempt": attempt + 1,
        }
        if rc != 0:
            result["stderr_tail"] = "\n".join(err.strip().splitlines()[-20:])
        if rc == 0 or not any(t in err for t in TRANSIENT) or attempt == retries:
            return result
        print(f"  {' '.join(cmd[:3])}: exit {rc}, looks transient; retrying in 60 s", flush=True)
        time.sleep(60)
    return result


def per_type_auroc(predictions: Path) -> dict[str, Any]:
    """From a test's predictions.csv: image AUROC overall and of each defect type against all good
    images, by the image score and by the highest value of the stitched map (``max_pixel_score``)."""
    from defectscope.metrics import auroc

    rows = []
    with predictions.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                score, peak = float(row["score"]), float(row["max_pixel_score"])
            except (TypeError, ValueError):
                continue
            if math.isfinite(score) and math.isfinite(peak) and row.get("label") in ("0", "1"):
                rows.append((int(row["label"]), row.get("defect_type") or "", score, peak))

    def area(kind: str | None, column: int) -> float | None:
        chosen = [r for r in rows if r[0] == 0 or kind is None or r[1] == kind]
        labels = [r[0] for r in chosen]
        if not 0 < sum(labels) < len(labels):
            return None
        return finite_or_none(auroc(labels, [r[column] for r in chosen]))

    out: dict[str, Any] = {
        "all": {"n": sum(r[0] for r in rows), "auroc": area(None, 2), "auroc_map_max": area(None, 3)}
    }
    for kind in sorted({r[1] for r in rows if r[0] == 1}):
        out[kind] = {
            "n": sum(r[0] == 1 and r[1] == kind for r in rows),
            "auroc": area(kind, 2),
            "auroc_map_max": area(kind, 3),
        }
    return out


def refresh(record: dict[str, Any]) -> dict[str, Any]:
    """Recompute the per-defect-type figures of a saved record from its run folder, where it still exists."""
    for key, folder in (("test", "test"), ("test_square", "test_square")):
        csv_path = Path(record.get("run_dir", "")) / folder / "predictions.csv"
        if record.get("status") == "ok" and key in record and csv_path.exists():
            record[key]["per_defect_type"] = per_type_auroc(csv_path)
    return record


def test_figures(cmd_result: dict[str, Any], folder: Path) -> dict[str, Any]:
    metrics = json.loads((folder / "metrics.json").read_text())
    return {
        "wall_s": cmd_result["wall_s"],
        "cpu_s": cmd_result["cpu_s"],
        "load_average_1min": cmd_result["load_average_1min"],
        "peak_rss_bytes": cmd_result["peak_rss_bytes"],
        "images_per_second": metrics.get("images_per_second"),
        "pixel_resolution": metrics.get("pixel_resolution"),
        "n_images": metrics.get("n_images"),
        "n_errors": metrics.get("n_errors"),
        "metrics": {k: finite_or_none(v) for k, v in metrics.get("metrics", {}).items()},
        "per_defect_type": per_type_auroc(folder / "predictions.csv"),
        "notes": metrics.get("notes", []),
    }


def run_config(cfg: dict[str, Any], datasets_root: Path, work: Path, timeout: float) -> dict[str, Any]:
    """Fit and test one configuration; the record of what was measured (or where it failed)."""
    data_dir = datasets_root / DATASETS[cfg["dataset"]]
    run = work / cfg["name"]
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        **cfg,
        "data_dir": str(data_dir),
        "run_dir": str(run),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(),
    }
    try:
        if run.exists():
            shutil.rmtree(run)
        fit = timed(
            [CLI, "fit", str(data_dir), "--out", str(run), *cfg["fit_args"]], logs / f"{cfg['name']}.fit", timeout
        )
        if fit["rc"] != 0:
            raise RuntimeError(f"fit exited {fit['rc']}: {fit.get('stderr_tail', '')}")
        saved = json.loads((run / "config.json").read_text())
        info = saved.get("run", {})
        record["fit"] = {
            "fit_seconds": info.get("fit_seconds"),
            "wall_s": fit["wall_s"],
            "cpu_s": fit["cpu_s"],
            "load_average_1min": fit["load_average_1min"],
            "peak_rss_bytes": fit["peak_rss_bytes"],
            "n_fit_images": info.get("n_fit_images"),
            "n_calibration_images": info.get("n_calibration_images"),
            "stdout": fit["stdout"].strip(),
        }
        record["geometry_saved"] = saved.get("geometry")
        record["params"] = saved.get("params")
        record["model_bytes"] = sum(p.stat().st_size for p in run.glob("*.safetensors"))
        test = timed(
            [CLI, "test", str(run), "--pixel-resolution", "native", "--out", str(run / "test")],
            logs / f"{cfg['name']}.test",
            timeout,
        )
        if test["rc"] != 0:
            raise RuntimeError(f"test exited {test['rc']}: {test.get('stderr_tail', '')}")
        record["test"] = test_figures(test, run / "test")
        record["geometry_described"] = json.loads((run / "test" / "metrics.json").read_text())["model"].get("geometry")
        if cfg["square_protocol"]:
            square = timed(
                [
                    CLI,
                    "test",
                    str(run),
                    "--pixel-resolution",
                    "square",
                    "--out",
                    str(run / "test_square"),
                    "--no-overlays",
                ],
                logs / f"{cfg['name']}.test_square",
                timeout,
            )
            if square["rc"] != 0:
                raise RuntimeError(f"square test exited {square['rc']}: {square.get('stderr_tail', '')}")
            record["test_square"] = test_figures(square, run / "test_square")
        record["status"] = "ok"
    except Exception as exc:  # a failed configuration is recorded, and the next one goes on
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return record


# -- the camera check ---------------------------------------------------------------------------------
def camera_images(datasets_root: Path, folder: Path) -> tuple[Path, Path]:
    """An 8000 x 2000 px image of a repeated mtd good image (mirrored at every repeat, so no seam
    breaks the texture), with and without a 3 px dark scratch."""
    import numpy as np
    from PIL import Image, ImageDraw

    good = sorted((datasets_root / DATASETS["mtd"] / "train" / "good").iterdir())
    src = Image.open(good[0]).convert("RGB")
    w, h = CAMERA_SIZE
    tile_h = 500
    src = src.resize((max(1, round(src.width * tile_h / src.height)), tile_h), Image.Resampling.BILINEAR)
    pixels = np.asarray(src)
    block = np.concatenate([pixels, pixels[:, ::-1]], axis=1)
    block = np.concatenate([block, block[::-1]], axis=0)
    reps = (math.ceil(h / block.shape[0]), math.ceil(w / block.shape[1]), 1)
    canvas = np.ascontiguousarray(np.tile(block, reps)[:h, :w])
    folder.mkdir(parents=True, exist_ok=True)
    clean = folder / "camera_clean.png"
    Image.fromarray(canvas).save(clean)
    scratched = Image.fromarray(canvas.copy())
    # A short diagonal scratch, 3 px wide, about 240 px long.
    ImageDraw.Draw(scratched).line([(5230, 1120), (5420, 1260)], fill=(25, 25, 25), width=3)
    scratch = folder / "camera_scratch.png"
    scratched.save(scratch)
    return clean, scratch


def run_camera(datasets_root: Path, work: Path, timeout: float) -> dict[str, Any]:
    run = work / CAMERA_RUN
    folder = work / "camera"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "name": "camera",
        "run": CAMERA_RUN,
        "image_size_px": list(CAMERA_SIZE),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(),
    }
    try:
        if not (run / "config.json").exists():
            raise RuntimeError(f"{run} holds no fitted model (run {CAMERA_RUN} first)")
        if folder.exists():
            shutil.rmtree(folder)
        clean, scratch = camera_images(datasets_root, folder)
        cases = {
            "scratch": [str(scratch)],
            "scratch_heatmaps": [str(scratch), "--heatmaps", str(folder / "heatmaps")],
            "clean": [str(clean)],
        }
        for case, args in cases.items():
            out = folder / f"{case}.json"
            r = timed([CLI, "predict", str(run), *args, "--out", str(out)], logs / f"camera.{case}", timeout)
            if r["rc"] not in (0,):
                raise RuntimeError(f"predict ({case}) exited {r['rc']}: {r.get('stderr_tail', '')}")
            result = json.loads(out.read_text())
            item = result[0] if isinstance(result, list) else result.get("predictions", [result])[0]
            record[case] = {
                "wall_s": r["wall_s"],
                "cpu_s": r["cpu_s"],
                "load_average_1min": r["load_average_1min"],
                "peak_rss_bytes": r["peak_rss_bytes"],
                "score": item.get("score"),
                "normalized_score": item.get("normalized_score"),
                "verdict": item.get("verdict"),
                "max_pixel_score": item.get("max_pixel_score"),
            }
        heatmaps = sorted(p for p in (folder / "heatmaps").iterdir() if p.is_file() and not p.name.startswith("."))
        record["heatmap_files"] = [{"name": p.name, "bytes": p.stat().st_size} for p in heatmaps]
        if heatmaps:
            from PIL import Image

            with Image.open(heatmaps[0]) as im:
                record["heatmap_size_px"] = list(im.size)
        record["status"] = "ok"
    except Exception as exc:
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return record


# -- the table --------------------------------------------------------------------------------------


def gb(x: int | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| data | method | geometry | image AUROC | image AUROC by map max | pixel AUROC | AUPRO | "
        "thin defects: image AUROC | "
        "fit s | fit peak RSS GB | model MB | test img/s | test wall s | test peak RSS GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["runs"]:
        if r.get("name") == "camera":
            continue
        geometry = r["geometry"] + (" (coreset 0.02)" if "coreset_ratio=0.02" in r.get("extra", []) else "")
        data = "bottle" if r["dataset"] == "mvtec_bottle" else r["dataset"]
        if r["status"] != "ok":
            lines.append(
                f"| {data} | {r['method']} | {geometry} | failed: {r.get('error', '?')[:200]} | | | | | | | | |"
            )
            continue
        t, fit = r["test"], r["fit"]
        thin = ", ".join(f"{k} {f3(t['per_defect_type'].get(k, {}).get('auroc'))}" for k in THIN.get(r["dataset"], []))
        m = t["metrics"]
        lines.append(
            f"| {data} | {r['method']} | {geometry} | {f3(m.get('image_auroc'))} | "
            f"{f3(t['per_defect_type'].get('all', {}).get('auroc_map_max'))} | {f3(m.get('pixel_auroc'))} | "
            f"{f3(m.get('aupro'))} | {thin} | {fit['fit_seconds']:.1f} | {gb(fit['peak_rss_bytes'])} | "
            f"{r['model_bytes'] / 1e6:.1f} | "
            f"{t['images_per_second']:.1f} | {t['wall_s']:.1f} | {gb(t['peak_rss_bytes'])} |"
        )
    lines += [
        "",
        "Square models under the square protocol (`--pixel-resolution square`):",
        "",
        "| data | method | pixel AUROC native | pixel AUROC square | AUPRO native | AUPRO square |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["runs"]:
        if r.get("status") == "ok" and r.get("test_square"):
            n, s = r["test"]["metrics"], r["test_square"]["metrics"]
            data = "bottle" if r["dataset"] == "mvtec_bottle" else r["dataset"]
            lines.append(
                f"| {data} | {r['method']} | {f3(n.get('pixel_auroc'))} | {f3(s.get('pixel_auroc'))} | "
                f"{f3(n.get('aupro'))} | {f3(s.get('aupro'))} |"
            )
    lines += ["", "Image AUROC per defect type (good against that type):", ""]
    for dataset in DATASETS:
        rows = [r for r in summary["runs"] if r.get("dataset") == dataset and r.get("status") == "ok"]
        if not rows:
            continue
        kinds = sorted({k for r in rows for k in r["test"]["per_defect_type"]} - {"all"})
        lines += [
            f"| {dataset} | geometry | " + " | ".join(kinds) + " |",
            "| --- | --- | " + " | ".join("---" for _ in kinds) + " |",
        ]
        for r in rows:
            p = r["test"]["per_defect_type"]
            lines.append(
                f"| {r['method']} | {r['geometry']} | "
                + " | ".join(f3(p.get(k, {}).get("auroc")) for k in kinds)
                + " |"
            )
        lines.append("")
    cam = next((r for r in summary["runs"] if r.get("name") == "camera"), None)
    if cam and cam.get("status") == "ok":
        lines.append(f"Camera image {cam['image_size_px'][0]} x {cam['image_size_px'][1]} px, {cam['run']}:")
        lines.append("")
        for case in ("scratch", "scratch_heatmaps", "clean"):
            c = cam[case]
            lines.append(
                f"- {case}: {c['wall_s']:.1f} s, peak RSS {gb(c['peak_rss_bytes'])} GB, score {c['score']:.2f} "
                f"({c['normalized_score']:.2f} x threshold, {c['verdict']})"
            )
    elif cam:
        lines.append(f"Camera image: failed: {cam.get('error')}")
    return "\n".join(lines)


def load(names: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        path = RUNS_DIR / f"{name}.json"
        if path.exists():
            out.append(json.loads(path.read_text()))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_datasets_root(parser)
    parser.add_argument("--work", default="/tmp/geobench", help="folder for the run folders (not the repository)")
    names = [c["name"] for c in CONFIGS]
    parser.add_argument("--only", nargs="+", choices=names, help="these configurations only (in the usual order)")
    parser.add_argument("--force", action="store_true", help="rerun configurations already saved")
    parser.add_argument("--analyse-only", action="store_true", help="the table from the saved results")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds before one command is abandoned")
    args = parser.parse_args(argv)
    root, work = Path(args.datasets_root), Path(args.work)
    chosen = [c for c in CONFIGS if not args.only or c["name"] in args.only]

    if not args.analyse_only:
        for cfg in chosen:
            path = RUNS_DIR / f"{cfg['name']}.json"
            if saved_ok(path, args.force):
                print(f"{cfg['name']}: saved, skipped", flush=True)
                continue
            print(f"{datetime.now():%H:%M:%S} {cfg['name']}: running", flush=True)
            if cfg["name"] == "camera":
                record = run_camera(root, work, args.timeout)
            else:
                record = run_config(cfg, root, work, args.timeout)
            write_json(path, record)
            if record["status"] != "ok":
                print(f"{datetime.now():%H:%M:%S} {cfg['name']}: FAILED {record['error']}", flush=True)
            elif cfg["name"] == "camera":
                s = record["scratch"]
                print(
                    f"{datetime.now():%H:%M:%S} camera: {s['wall_s']:.1f} s, {gb(s['peak_rss_bytes'])} GB, "
                    f"score {s['score']:.2f}",
                    flush=True,
                )
            else:
                m = record["test"]["metrics"]
                print(
                    f"{datetime.now():%H:%M:%S} {cfg['name']}: image AUROC {f3(m.get('image_auroc'))}, pixel AUROC "
                    f"{f3(m.get('pixel_auroc'))}, AUPRO {f3(m.get('aupro'))}, "
                    f"fit {record['fit']['fit_seconds']:.0f} s, "
                    f"test {record['test']['wall_s']:.0f} s",
                    flush=True,
                )

    runs = [refresh(r) for r in load(names)]
    for r in runs:
        write_json(RUNS_DIR / f"{r['name']}.json", r)
    summary = {
        "command": "python bench/bench_geometry.py",
        "date": str(date.today()),
        "environment": next((r["environment"] for r in runs if r.get("environment")), None),
        "runs": runs,
        "missing": [n for n in names if n not in {r["name"] for r in runs if r.get("status") == "ok"}],
    }
    finish_summary(SUMMARY, summary, markdown(summary))


if __name__ == "__main__":
    main()
