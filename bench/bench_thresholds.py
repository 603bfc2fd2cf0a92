"""Threshold rules on real data: measured false-alarm and miss rates of conformal targets against mean + 3 sd.

Each (method, dataset) is fitted once and tested once on the full test split, in its own process;
the held-out good scores and the test scores are saved per run under
``bench/results/thresholds/`` as soon as the run finishes (a rerun skips runs already saved,
unless ``--force``). The rules are then applied offline to those scores: every rule sees the
same held-out good scores and is judged on the same test images (anomalous when score > threshold).

    python bench/bench_thresholds.py                         # all runs, then the tables
    python bench/bench_thresholds.py --methods patchcore dmad --datasets mvtec_bottle
    python bench/bench_thresholds.py --analyse-only          # tables from the saved runs only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from common import add_datasets_root, environment, finish_summary, finite_or_none, saved_ok, write_json

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
RESULTS = REPO / "bench" / "results"
RUNS_DIR = RESULTS / "thresholds"
SUMMARY = RESULTS / "thresholds.json"
DATASETS = {"mvtec_bottle": "mvtec_bottle/bottle", "mtd": "mtd/magnetic_tile"}
#: Run order: the methods that matter most first, the slow trained ones last.
METHOD_ORDER = [
    "patchcore",
    "dmad",
    "padim",
    "reverse_distillation",
    "mkd",
    "students",
    "spade",
    "draem",
    "ddad",
    "glad",
]
#: Departures from the method defaults, forced by CPU time (stated in BENCHMARKS.md).
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "draem": {"time_budget": 300},
    "ddad": {"time_budget": 300},
    "glad": {"time_budget": 300},
}
#: The rules compared: the old default and conformal targets.
RULES: list[dict[str, Any]] = [
    {"label": "mean + 3 sd", "rule": "mean_sigma", "sigmas": 3.0},
    {"label": "conformal A=0.01", "rule": "conformal", "false_alarm_rate": 0.01},
    {"label": "conformal A=0.05", "rule": "conformal", "false_alarm_rate": 0.05},
    {"label": "conformal A=0.10", "rule": "conformal", "false_alarm_rate": 0.10},
]
#: Error text that suggests a file of the tree was caught mid-edit: the run is retried.
TRANSIENT = ("ImportError", "ModuleNotFoundError", "SyntaxError", "IndentationError", "circular import")


def run_path(method: str, dataset: str) -> Path:
    return RUNS_DIR / f"{method}__{dataset}.json"


# -- one run (own process) ----------------------------------------------------------------------
def run_one(method: str, dataset: str, data_dir: Path, out: Path) -> None:
    """Fit and test one (method, dataset); write its scores to ``out``."""
    from defectscope.data import mvtec_samples
    from defectscope.evaluate import evaluate
    from defectscope.methods import METHODS

    params = METHOD_PARAMS.get(method, {})
    record: dict[str, Any] = {
        "method": method,
        "dataset": dataset,
        "data_dir": str(data_dir),
        "params_given": params,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(),
    }
    try:
        det = METHODS[method](**params)
        record["params"] = {k: v for k, v in det.get_params().items() if _jsonable(v)}
        start = time.perf_counter()
        det.fit(data_dir)
        record["fit_s"] = time.perf_counter() - start
        record["fit_info"] = {k: v for k, v in det.fit_info.items() if k != "labelled_defects" and _jsonable(v)}
        cal = det.calibration
        if cal is None or cal.good_scores is None:
            raise RuntimeError("the fitted detector kept no held-out good scores")
        record["held_out_good_scores"] = list(cal.good_scores)
        record["n_held_out"] = cal.n_images
        record["default_calibration"] = cal.summary()
        samples = mvtec_samples(data_dir, "test")
        start = time.perf_counter()
        result = evaluate(det, samples)
        record["test_s"] = time.perf_counter() - start
        record["test"] = [
            {
                "path": str(Path(r.path).relative_to(data_dir)) if Path(r.path).is_relative_to(data_dir) else r.path,
                "score": finite_or_none(r.score),
                "label": r.label,
                "defect_type": r.defect_type,
            }
            for r in result.records
        ]
        record["metrics"] = {k: finite_or_none(float(v)) for k, v in result.metrics.items()}
        record["image_auroc"] = record["metrics"].get("image_auroc")
        record["eval_notes"] = list(result.notes)
        record["status"] = "ok"
    except Exception as exc:  # a failed run is recorded, and the next one goes on
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_json(out, record)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def launch(method: str, dataset: str, data_dir: Path, timeout: float, retries: int) -> dict[str, Any]:
    """Run one configuration in a child process; retry when the tree looked mid-edit."""
    out = run_path(method, dataset)
    for attempt in range(retries + 1):
        cmd = [sys.executable, str(SCRIPT), "--one", method, dataset, str(data_dir)]
        env = dict(os.environ, DEFECTSCOPE_NO_PROGRESS="1")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            stderr, rc = proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            stderr, rc = f"TimeoutExpired: the run took more than {timeout:.0f} s\n{exc.stderr or ''}", -1
        wall = time.perf_counter() - start
        if out.exists() and rc == 0:
            record = json.loads(out.read_text())
        else:
            tail = "\n".join(stderr.strip().splitlines()[-15:]) or "no output"
            record = {
                "method": method,
                "dataset": dataset,
                "status": "error",
                "error": f"child process exited {rc}: {tail.splitlines()[-1] if tail else ''}",
                "traceback": tail,
            }
        record["wall_s"] = wall
        record["attempt"] = attempt + 1
        write_json(out, record)
        transient = record["status"] == "error" and any(t in record.get("traceback", "") for t in TRANSIENT)
        if not transient or attempt == retries:
            return record
        print(f"  {method} {dataset}: {record['error']} (looks transient; retrying in 60 s)", flush=True)
        time.sleep(60)
    return record


# -- analysis (offline, from saved scores) -------------------------------------------------------
def rate(count: int, n: int) -> dict[str, Any]:
    from defectscope.thresholds import rate_interval

    low, high = rate_interval(count, n)
    return {"count": count, "n": n, "rate": count / n if n else None, "interval": [low, high]}


def apply_rule(run: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One rule's threshold from the held-out good scores, judged on the run's test images."""
    from defectscope.thresholds import calibrate

    settings = {k: v for k, v in spec.items() if k not in ("label", "rule")}
    cal = calibrate(run["held_out_good_scores"], rule=spec["rule"], **settings)
    thr = cal.threshold
    test = [t for t in run["test"] if t["score"] is not None]
    goods = [t for t in test if t["label"] == 0]
    defects = [t for t in test if t["label"] == 1]
    fp = sum(t["score"] > thr for t in goods)
    tp = sum(t["score"] > thr for t in defects)
    tn, fn = len(goods) - fp, len(defects) - tp
    per_type: dict[str, Any] = {}
    for kind in sorted({t["defect_type"] for t in defects}):
        of_kind = [t for t in defects if t["defect_type"] == kind]
        per_type[kind] = rate(sum(t["score"] <= thr for t in of_kind), len(of_kind))
    n = len(test)
    far = rate(fp, len(goods))
    target = spec.get("false_alarm_rate")
    return {
        "label": spec["label"],
        "rule": spec["rule"],
        **settings,
        "threshold": thr,
        "n_held_out": cal.n_images,
        "false_alarm_bound": cal.false_alarm_bound,
        "supports_target": not cal.notes,
        "notes": list(cal.notes),
        "false_alarm": far,
        "target_in_interval": None if target is None else far["interval"][0] <= target <= far["interval"][1],
        "miss": rate(fn, len(defects)),
        "miss_per_defect_type": per_type,
        "confusion": {"TP": tp, "FP": fp, "TN": tn, "FN": fn},
        "accuracy": (tp + tn) / n if n else None,
        "balanced_accuracy": (tp / len(defects) + tn / len(goods)) / 2 if defects and goods else None,
        "n_test_left_out": len(run["test"]) - n,
    }


def good_shift(run: dict[str, Any]) -> dict[str, Any]:
    """Do the test good images score like the held-out good ones? (what the conformal bound assumes)"""
    import numpy as np
    from scipy.stats import mannwhitneyu

    held = np.asarray(run["held_out_good_scores"])
    test = np.asarray([t["score"] for t in run["test"] if t["label"] == 0 and t["score"] is not None])
    return {
        "median_held_out": float(np.median(held)),
        "median_test": float(np.median(test)),
        "test_above_held_out_median": int((test > np.median(held)).sum()),
        "test_above_held_out_max": int((test > held.max()).sum()),
        "n_test_good": int(test.size),
        "mannwhitney_p": float(mannwhitneyu(held, test).pvalue),
    }


def load_runs(methods: Sequence[str], datasets: Sequence[str]) -> list[dict[str, Any]]:
    runs = []
    for method in methods:
        for dataset in datasets:
            path = run_path(method, dataset)
            if path.exists():
                runs.append(json.loads(path.read_text()))
    return runs


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def markdown_tables(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    for dataset in summary["datasets"]:
        rows = [r for r in summary["runs"] if r["dataset"] == dataset]
        if not rows:
            continue
        first = next((r for r in rows if r["status"] == "ok"), None)
        n_good = first["rules"][0]["false_alarm"]["n"] if first else "?"
        n_def = first["rules"][0]["miss"]["n"] if first else "?"
        lines += [
            f"### {dataset} (test: {n_good} good, {n_def} defect images)",
            "",
            "| method | threshold rule | held-out n | bound | FAR measured (count/n, 95 % interval) | miss rate "
            "(count/n, 95 % interval) | accuracy | image AUROC |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for run in rows:
            if run["status"] != "ok":
                lines.append(f"| {run['method']} | failed: {run.get('error', '?')} | | | | | | |")
                continue
            for i, r in enumerate(run["rules"]):
                far, miss = r["false_alarm"], r["miss"]
                bound = f"{r['false_alarm_bound']:.3f}" + ("" if r["supports_target"] else " (n too small)")
                lines.append(
                    f"| {run['method'] if i == 0 else ''} | {r['label']} | {r['n_held_out']} | {bound} | "
                    f"{pct(far['rate'])} ({far['count']}/{far['n']}, "
                    f"{pct(far['interval'][0])}-{pct(far['interval'][1])}) | "
                    f"{pct(miss['rate'])} ({miss['count']}/{miss['n']}, {pct(miss['interval'][0])}-"
                    f"{pct(miss['interval'][1])}) | {pct(r['accuracy'])} | "
                    f"{'' if i else format(run['image_auroc'], '.3f')} |"
                )
        lines.append("")
        lines += aggregate_table(rows)
    return "\n".join(lines)


def aggregate_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per rule over the finished runs of one dataset: pooled false alarms, accuracy, target coverage."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    lines = [
        f"All {len(ok)} finished runs pooled (false alarms summed over methods; "
        "each method's test/good is the same images):",
        "",
        "| threshold rule | false alarms (sum/n) | runs: FAR > target | runs: 95 % interval above / below target "
        "| misses (sum/n) "
        "| mean accuracy | mean balanced accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, spec in enumerate(RULES):
        rs = [r["rules"][i] for r in ok]
        fa = sum(r["false_alarm"]["count"] for r in rs)
        n_fa = sum(r["false_alarm"]["n"] for r in rs)
        mi = sum(r["miss"]["count"] for r in rs)
        n_mi = sum(r["miss"]["n"] for r in rs)
        target = spec.get("false_alarm_rate")
        above = "-" if target is None else str(sum(r["false_alarm"]["rate"] > target for r in rs))
        outside = (
            "-"
            if target is None
            else f"{sum(r['false_alarm']['interval'][0] > target for r in rs)} / "
            f"{sum(r['false_alarm']['interval'][1] < target for r in rs)}"
        )
        acc = sum(r["accuracy"] for r in rs) / len(rs)
        bal = sum(r["balanced_accuracy"] for r in rs) / len(rs)
        lines.append(
            f"| {spec['label']} | {pct(fa / n_fa)} ({fa}/{n_fa}) | {above} | {outside} "
            f"| {pct(mi / n_mi)} ({mi}/{n_mi}) "
            f"| {pct(acc)} | {pct(bal)} |"
        )
    lines.append("")
    return lines


def analyse(methods: Sequence[str], datasets: Sequence[str]) -> dict[str, Any]:
    runs = load_runs(methods, datasets)
    out_runs = []
    for run in runs:
        row: dict[str, Any] = {
            k: run.get(k)
            for k in (
                "method",
                "dataset",
                "status",
                "error",
                "params_given",
                "params",
                "fit_s",
                "test_s",
                "wall_s",
                "n_held_out",
                "image_auroc",
                "metrics",
                "default_calibration",
                "started",
                "finished",
            )
            if run.get(k) is not None
        }
        training = (run.get("fit_info") or {}).get("training")
        if training:
            row["training"] = training
        if run.get("status") == "ok":
            row["rules"] = [apply_rule(run, spec) for spec in RULES]
            row["held_out_vs_test_good"] = good_shift(run)
        out_runs.append(row)
    done = {(r["method"], r["dataset"]) for r in out_runs if r["status"] == "ok"}
    env = next((r["environment"] for r in runs if r.get("environment")), None)
    return {
        "command": "python bench/bench_thresholds.py",
        "date": str(date.today()),
        "environment": env,
        "verdict": "anomalous when score > threshold",
        "rules": RULES,
        "method_params": METHOD_PARAMS,
        "datasets": list(datasets),
        "runs": out_runs,
        "missing": [f"{m} {d}" for m in methods for d in datasets if (m, d) not in done],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_datasets_root(parser)
    parser.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=METHOD_ORDER)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--force", action="store_true", help="refit runs already saved")
    parser.add_argument("--analyse-only", action="store_true", help="recompute the tables from the saved runs")
    parser.add_argument("--run-timeout", type=float, default=2400, help="seconds before one run is abandoned")
    parser.add_argument("--retries", type=int, default=2, help="retries of a run that failed on an import error")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "DATASET", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one[0], args.one[1], Path(args.one[2]), run_path(args.one[0], args.one[1]))
        return

    if not args.analyse_only:
        for method in args.methods:
            for dataset in args.datasets:
                path = run_path(method, dataset)
                if saved_ok(path, args.force):
                    print(f"{method} {dataset}: saved, skipped", flush=True)
                    continue
                print(f"{datetime.now():%H:%M:%S} {method} {dataset}: running", flush=True)
                r = launch(
                    method, dataset, Path(args.datasets_root) / DATASETS[dataset], args.run_timeout, args.retries
                )
                if r["status"] == "ok":
                    print(
                        f"{datetime.now():%H:%M:%S} {method} {dataset}: image AUROC {r['image_auroc']:.3f}, "
                        f"n held out {r['n_held_out']}, fit {r['fit_s']:.0f} s, test {r['test_s']:.0f} s",
                        flush=True,
                    )
                else:
                    print(f"{datetime.now():%H:%M:%S} {method} {dataset}: FAILED {r['error']}", flush=True)

    summary = analyse(args.methods, args.datasets)
    finish_summary(SUMMARY, summary, markdown_tables(summary))


if __name__ == "__main__":
    main()
