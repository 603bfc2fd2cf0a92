"""Parity of the exported graphs with torch on the real test sets, for every exportable method.

For each method and dataset (``mvtec_bottle``, ``mtd``) a model is fitted (the trained methods under
a short ``--time-budget``: parity does not need a good model, only a real one), exported, and every
test image is scored by torch and by each engine (onnxruntime with PatchCore's default handover to
faiss, onnxruntime with the whole graph, OpenVINO). Recorded per engine: the largest relative score
difference, the largest map difference divided by the threshold (maps compared at the working
resolution, as ``predict`` returns them), whether every verdict is identical, and the image AUROC of
both. One JSON per (dataset, method) in ``bench/results/parity/``, written as soon as it is measured
(a rerun skips finished ones unless ``--force``); fitted runs go to ``--work``.

    python bench/bench_parity.py                          # every exportable method on both datasets
    python bench/bench_parity.py --only mtd-padim mvtec_bottle-patchcore
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import environment

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "parity"
DATASETS = {"mvtec_bottle": "mvtec_bottle/bottle", "mtd": "mtd/magnetic_tile"}
#: Methods trained in epochs get this many seconds of training (parity, not accuracy, is measured).
TRAIN_BUDGET = 60
ENGINES = [("onnxruntime", False), ("onnxruntime", True), ("openvino", True)]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from defectscope.metrics.summary import image_metrics

    return float(image_metrics(labels, scores)["image_auroc"])


def measure(dataset: str, method: str, data_root: Path, work: Path) -> dict[str, Any]:
    from defectscope.data.sources import labelled_samples
    from defectscope.engines import EngineChoice, use_engine
    from defectscope.methods import METHODS, load
    from defectscope.methods.trained import TrainedDetector
    from defectscope.runs import fit_run

    data = data_root / DATASETS[dataset]
    run = work / f"{dataset}-{method}"
    params: dict[str, Any] = {}
    if issubclass(METHODS[method], TrainedDetector):
        params["time_budget"] = TRAIN_BUDGET
    start = time.perf_counter()
    fit_run(data, run, method=method, params=params, overwrite=True)
    fit_s = time.perf_counter() - start
    samples = labelled_samples(data)
    labels = np.array([s.label for s in samples])
    detector = load(run)
    threshold = detector.calibration.threshold if detector.calibration else None
    reference = list(detector.inspect(samples, desc=f"{dataset} {method} torch"))
    ref_scores = np.array([i.score for i in reference])
    out: dict[str, Any] = {
        "dataset": dataset,
        "method": method,
        "n_images": len(samples),
        "fit_seconds": round(fit_s, 1),
        "threshold": threshold,
        "torch_image_auroc": auroc(labels, ref_scores),
        "engines": {},
    }
    for engine, whole in ENGINES:
        if whole and method != "patchcore" and engine == "onnxruntime":
            continue  # only PatchCore hands over to torch code: its default already is the whole graph
        try:
            use_engine(detector, EngineChoice(engine, whole_graph=whole), run)
        except Exception as exc:  # an engine that is not installed is recorded as such
            out["engines"][f"{engine}{' whole' if whole else ''}"] = {"error": str(exc)}
            continue
        t = time.perf_counter()
        items = list(detector.inspect(samples, desc=f"{dataset} {method} {engine}"))
        seconds = time.perf_counter() - t
        scores = np.array([i.score for i in items])
        rel = np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), max(abs(threshold or 0), 1e-30))
        scale = abs(threshold) if threshold else max(float(np.abs(r.map).max()) for r in reference)
        map_diff = max(float(np.abs(a.map - b.map).max()) for a, b in zip(items, reference)) / scale
        same = threshold is None or bool(np.array_equal(scores > threshold, ref_scores > threshold))
        out["engines"][f"{engine}{' whole' if whole and engine == 'onnxruntime' else ''}"] = {
            "score_rel_max": float(rel.max()),
            "map_abs_max_over_threshold": map_diff,
            "verdicts_identical": same,
            "image_auroc": auroc(labels, scores),
            "images_per_second": round(len(items) / seconds, 1),
        }
        detector.engine = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets"), help="datasets root")
    parser.add_argument("--work", default="/tmp/paritybench", help="where fitted runs go")
    parser.add_argument("--only", nargs="*", help="DATASET-METHOD names to run")
    parser.add_argument("--force", action="store_true", help="measure again what has results")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from defectscope.methods import METHODS

    methods = sorted(name for name, cls in METHODS.items() if cls.export_unsupported is None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for dataset in DATASETS:
        for method in methods:
            name = f"{dataset}-{method}"
            target = RESULTS / f"{name}.json"
            if (args.only and name not in args.only) or (target.exists() and not args.force):
                continue
            print(f"== {name}", flush=True)
            result = measure(dataset, method, Path(args.data), Path(args.work))
            result["environment"] = environment()
            result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
            target.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result["engines"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
