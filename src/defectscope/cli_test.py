"""``defectscope test``: score labelled test images, write metrics, predictions, overlays and a report.

A unified run (one model over several categories) is tested category by category, each in its
own sub-folder, and summarised with per-category and mean metrics. Labelled defect images the
model was fitted with are always left out, and the run says so.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data import Sample, folder_samples
from .data.sources import labelled_samples, resolve_categories
from .errors import DefectscopeError
from .evaluate import evaluate
from .methods import Detector, load
from .report.html import write_report
from .report.overlay import display_max, input_name, overlay, overlay_name, to_rgb


def format_records(records: list[dict[str, Any]], fmt: str) -> str:
    """Per-image records as JSON or CSV text."""
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if not records:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def metrics_table(metrics: dict[str, float]) -> str:
    if not metrics:
        return "no metrics (see the notes above)"
    width = max(len(k) for k in metrics)
    rows = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
    rows += [f"{k.ljust(width)}  {v:.4f}" for k, v in metrics.items()]
    return "\n".join(rows)


def _category_dirs(args: argparse.Namespace, detector: Detector) -> list[Path]:
    if args.data:
        return resolve_categories([args.data], args.category, args.categories)
    recorded = detector.fit_info.get("category_dirs") or ([detector.fit_info["data"]] if detector.fit_info.get("data") else [])
    if not recorded:
        raise DefectscopeError("no test data: pass DATA (the model does not record where it was fitted)")
    return [Path(p) for p in recorded]


def _without_training_defects(samples: list[Sample], detector: Detector) -> tuple[list[Sample], list[str]]:
    used = {os.path.realpath(p) for p in detector.fit_info.get("labelled_defects", [])}
    kept = [s for s in samples if os.path.realpath(s.path) not in used]
    dropped = len(samples) - len(kept)
    notes = [f"{dropped} labelled defect image(s) the model was fitted with are left out of this evaluation"] if dropped else []
    return kept, notes


def _test_one(detector: Detector, samples: list[Sample], source: str, out: Path, args: argparse.Namespace,
              notes: list[str]) -> dict[str, Any]:
    overlays = out / "overlays"
    (overlays / "inputs").mkdir(parents=True, exist_ok=True)
    print(f"testing {args.run} on {len(samples)} images from {source}", file=sys.stderr)
    threshold = detector.calibration.threshold if detector.calibration else None

    def write_overlays(batch: dict[str, Any], pred: Any) -> None:
        if args.no_overlays:
            return
        for i, path in enumerate(batch["path"]):
            scale = display_max(threshold, pred.maps[i])
            mask = batch["mask"][i] if batch["has_mask"][i] else None
            defect = batch["defect_type"][i]
            overlay(batch["image"][i], pred.maps[i], scale, mask).save(overlays / overlay_name(path, defect))
            Image.fromarray(to_rgb(batch["image"][i])).save(overlays / "inputs" / input_name(path, defect), quality=90)
            if pred.reconstructions is not None:
                (overlays / "reconstructions").mkdir(exist_ok=True)
                Image.fromarray(to_rgb(pred.reconstructions[i])).save(
                    overlays / "reconstructions" / input_name(path, defect), quality=90)

    result = evaluate(detector, samples, args.batch_size, on_batch=write_overlays)
    notes = notes + result.notes
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    summary = {"run": str(args.run), "data": source, "n_images": len(samples),
               "n_defective": sum(s.label for s in samples), "images_per_second": round(result.images_per_second, 2),
               "threshold": threshold, "metrics": result.metrics, "notes": notes}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "predictions.csv").write_text(format_records(result.records, "csv"))
    report = write_report(out, summary, result.records, result.curves, with_images=not args.no_overlays,
                          with_reconstructions=(overlays / "reconstructions").is_dir())
    print(metrics_table(result.metrics))
    print(f"{result.images_per_second:.1f} images/s; wrote {report}, {out / 'metrics.json'}, {out / 'predictions.csv'}"
          + ("" if args.no_overlays else f", {overlays}/"))
    return summary


def cmd_test(args: argparse.Namespace) -> int:
    detector = load(args.run).to(args.device)
    out = Path(args.out) if args.out else Path(args.run) / "test"
    if args.good:
        samples = folder_samples(args.good, args.defects, args.masks, args.image_level_only)
        samples, notes = _without_training_defects(samples, detector)
        _test_one(detector, samples, str(Path(args.good).parent), out, args, notes)
        return 0
    dirs = _category_dirs(args, detector)
    if len(dirs) == 1:
        samples, notes = _without_training_defects(labelled_samples(dirs[0], None, args.image_level_only), detector)
        _test_one(detector, samples, str(dirs[0]), out, args, notes)
        return 0
    per_category = {}
    for directory in dirs:
        samples, notes = _without_training_defects(labelled_samples(directory, None, args.image_level_only), detector)
        print(f"\n== {directory.name} ==", file=sys.stderr)
        per_category[directory.name] = _test_one(detector, samples, str(directory), out / directory.name, args, notes)
    names = sorted({k for s in per_category.values() for k in s["metrics"]})
    mean = {k: float(np.mean([s["metrics"][k] for s in per_category.values() if k in s["metrics"]])) for k in names}
    summary = {"run": str(args.run), "categories": list(per_category), "mean_metrics": mean,
               "per_category": {name: s["metrics"] for name, s in per_category.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(n) for n in [*per_category, "mean"])
    shown = [k for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro") if k in mean]
    print("\n" + "category".ljust(width) + "".join(f"  {k:>11}" for k in shown))
    for name, s in per_category.items():
        print(name.ljust(width) + "".join(f"  {s['metrics'].get(k, float('nan')):11.4f}" for k in shown))
    print("mean".ljust(width) + "".join(f"  {mean[k]:11.4f}" for k in shown))
    print(f"wrote {out / 'metrics.json'} and one report folder per category under {out}")
    return 0
