"""The ``defectscope`` command: fit, test, predict and demo."""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from . import __version__
from .data import IMAGE_EXTENSIONS, ImageDataset, Sample, folder_samples, iterate_batches
from .data.sources import resolve_category, labelled_samples, training_samples
from .errors import DataError, DefectscopeError
from .evaluate import evaluate
from .methods import METHODS, Detector, load
from .methods.trained import TrainedDetector
from .report.html import write_report
from .report.overlay import display_max, input_name, overlay, overlay_name, to_rgb

EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "bottle_small"
DEFAULT_METHOD = "patchcore"


def _method_params_help() -> str:
    lines = []
    for name, cls in METHODS.items():
        params = inspect.signature(cls.__init__).parameters
        shown = ", ".join(f"{p}={v.default!r}" for p, v in params.items() if p != "self")
        lines.append(f"  {name}: {shown}")
    return "method parameters (set any with --set KEY=VALUE):\n" + "\n".join(lines)


def _parse_sets(pairs: Sequence[str], method: str) -> dict[str, Any]:
    """--set KEY=VALUE pairs -> constructor keywords (values parsed as JSON when they can be)."""
    allowed = set(inspect.signature(METHODS[method].__init__).parameters) - {"self"}
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise DefectscopeError(f"--set {pair!r}: expected KEY=VALUE")
        if key not in allowed:
            raise DefectscopeError(f"--set {key}: {method} has no parameter {key!r} (has: {', '.join(sorted(allowed))})")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def cmd_fit(args: argparse.Namespace) -> int:
    params = _parse_sets(args.set, args.method)
    for key in ("backbone", "image_size", "coreset_ratio", "weights", "seed", "batch_size", "epochs", "time_budget"):
        value = getattr(args, key)
        if value is not None:
            if key not in inspect.signature(METHODS[args.method].__init__).parameters:
                raise DefectscopeError(f"--{key.replace('_', '-')}: not a parameter of {args.method}")
            params[key] = value
    category_dir = resolve_category(args.data, args.category)
    samples = training_samples(category_dir)
    detector = METHODS[args.method](**params).to(args.device)
    print(f"fitting {detector!r}\n  on {len(samples)} good images from {category_dir}", file=sys.stderr)
    if isinstance(detector, TrainedDetector):
        detector.fit(samples, checkpoint_dir=Path(args.out) / "checkpoint", resume=args.resume)
    elif args.resume:
        raise DefectscopeError(f"--resume: {args.method} is not trained in epochs, there is nothing to resume")
    else:
        detector.fit(samples)
    detector.fit_info["data"] = str(category_dir.resolve())
    out = detector.save(args.out)
    info = detector.fit_info
    threshold = f"{detector.calibration.threshold:.4g}" if detector.calibration else "none (no held-out images)"
    print(f"fitted in {info['fit_seconds']:.1f} s on {info['n_fit_images']} images; threshold {threshold} "
          f"from {info['n_calibration_images']} held-out good images\nsaved to {out}")
    return 0


def _test_samples(args: argparse.Namespace, detector: Detector) -> tuple[list[Sample], str]:
    if args.good:
        return folder_samples(args.good, args.defects, args.masks, args.image_level_only), str(Path(args.good).parent)
    data = args.data or detector.fit_info.get("data")
    if not data:
        raise DefectscopeError("no test data: pass DATA (the model does not record where it was fitted)")
    return labelled_samples(data, args.category, args.image_level_only), str(data)


def cmd_test(args: argparse.Namespace) -> int:
    detector = load(args.run).to(args.device)
    samples, source = _test_samples(args, detector)
    out = Path(args.out) if args.out else Path(args.run) / "test"
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

    result = evaluate(detector, samples, args.batch_size, on_batch=write_overlays)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    summary = {"run": str(args.run), "data": source, "n_images": len(samples),
               "n_defective": sum(s.label for s in samples), "images_per_second": round(result.images_per_second, 2),
               "threshold": detector.calibration.threshold if detector.calibration else None,
               "metrics": result.metrics, "notes": result.notes}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "predictions.csv").write_text(_format_records(result.records, "csv"))
    report = write_report(out, summary, result.records, result.curves, with_images=not args.no_overlays)
    print(_metrics_table(result.metrics))
    print(f"{result.images_per_second:.1f} images/s; wrote {report}, {out / 'metrics.json'}, {out / 'predictions.csv'}"
          + ("" if args.no_overlays else f", {overlays}/"))
    return 0


def _metrics_table(metrics: dict[str, float]) -> str:
    if not metrics:
        return "no metrics (see the notes above)"
    width = max(len(k) for k in metrics)
    rows = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
    rows += [f"{k.ljust(width)}  {v:.4f}" for k, v in metrics.items()]
    return "\n".join(rows)


def _expand_inputs(paths: Sequence[str]) -> list[Path]:
    """Image files named on the command line, folders expanded to their images (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            for p in found:
                if p.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise DataError(f"{p}: not an image file (expected one of {' '.join(sorted(IMAGE_EXTENSIONS))})")
            if not found:
                raise DataError(f"{path}: folder holds no images")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    detector = load(args.run).to(args.device)
    files = _expand_inputs(args.paths)
    samples = [Sample(p.resolve(), 0, "unknown", None, "predict") for p in files]
    heatmaps = Path(args.heatmaps) if args.heatmaps else None
    if heatmaps:
        heatmaps.mkdir(parents=True, exist_ok=True)
    threshold = detector.calibration.threshold if detector.calibration else None
    records = []
    for batch in iterate_batches(ImageDataset(samples, detector.image_size), args.batch_size or detector.batch_size,
                                 desc="predicting"):
        pred = detector.predict(batch["image"])
        for i, path in enumerate(batch["path"]):
            score = float(pred.scores[i])
            record = {"path": path, "score": score,
                      "normalized_score": score / threshold if threshold else None,
                      "verdict": ("anomalous" if score > threshold else "good") if threshold else None}
            if heatmaps:
                name = f"{Path(path).stem}_heatmap.png"
                overlay(batch["image"][i], pred.maps[i], display_max(threshold, pred.maps[i])).save(heatmaps / name)
                record["heatmap"] = str(heatmaps / name)
            records.append(record)
    text = _format_records(records, args.format)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {len(records)} predictions to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _format_records(records: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if not records:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def cmd_demo(args: argparse.Namespace) -> int:
    data = Path(args.data) if args.data else EXAMPLE_DATA
    if not data.is_dir():
        raise DataError(f"{data}: bundled example not found; pass --data CATEGORY_DIR")
    out = Path(args.out)
    fit_args = build_parser().parse_args(["fit", str(data), "--out", str(out / "model")])
    cmd_fit(fit_args)
    test_args = build_parser().parse_args(["test", str(out / "model"), str(data), "--out", str(out / "test")])
    cmd_test(test_args)
    print(f"demo done: model in {out / 'model'}; open {out / 'test' / 'report.html'} for the report")
    return 0


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda / cuda:N when a GPU exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectscope",
        description="Industrial visual anomaly detection: fit on good images, then score, localise and judge new ones.")
    parser.add_argument("--version", action="version", version=f"defectscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", help="fit a detector on good images and save it to a run folder",
                         description="Fit a detector on the good images of DATA and save it (config.json + "
                                     "model.safetensors) to --out. A held-out slice of the good images "
                                     "calibrates the decision threshold.",
                         epilog=_method_params_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("data", metavar="DATA", help="an MVTec-layout category folder (uses train/good), a dataset "
                     "root holding categories (with --category) or a plain folder of good images")
    fit.add_argument("--out", required=True, metavar="RUN", help="run folder to write the model to")
    fit.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="detection method (default: %(default)s)")
    fit.add_argument("--category", help="category to use when DATA is a root holding several")
    fit.add_argument("--backbone", help="feature extractor: mobilenet_v2, efficientnet_lite0 (default), resnet18, wide_resnet50_2")
    fit.add_argument("--weights", help="explicit backbone weights file (else $DEFECTSCOPE_WEIGHTS_DIR, installed packages, download)")
    fit.add_argument("--image-size", type=int, help="square input size in pixels, multiple of 16 (default 256)")
    fit.add_argument("--coreset-ratio", type=float, help="PatchCore: fraction of patches kept in the memory bank (default 0.1)")
    fit.add_argument("--batch-size", type=int, help="images per batch (default 16)")
    fit.add_argument("--seed", type=int, help="random seed (default 0)")
    fit.add_argument("--epochs", type=int, help="trained methods: number of training epochs")
    fit.add_argument("--time-budget", type=float, metavar="SECONDS",
                     help="trained methods: stop training after this many seconds (counted across resumes)")
    fit.add_argument("--resume", action="store_true", help="trained methods: continue from the last checkpoint "
                     "in RUN/checkpoint instead of starting over")
    _add_device(fit)
    fit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other method parameter (see below)")
    fit.set_defaults(func=cmd_fit)

    test = sub.add_parser("test", help="evaluate a run on labelled test images: metrics, CSV, heat maps",
                          description="Score the test split, print image and pixel metrics, and write report.html (metrics, "
                                      "curves, score histogram, every image), metrics.json, predictions.csv and "
                                      "heat-map overlays (ground truth outlined in green).")
    test.add_argument("run", metavar="RUN", help="run folder written by `defectscope fit`")
    test.add_argument("data", nargs="?", metavar="DATA", help="MVTec-layout category folder (uses test/ and "
                      "ground_truth/); default: the folder the run was fitted on")
    test.add_argument("--category", help="category to use when DATA is a root holding several")
    test.add_argument("--good", metavar="DIR", help="plain-folder test set: good images (instead of DATA)")
    test.add_argument("--defects", metavar="DIR", help="plain-folder test set: defect images")
    test.add_argument("--masks", metavar="DIR", help="plain-folder test set: masks named <stem>_mask.png or <stem>.png")
    test.add_argument("--image-level-only", action="store_true", help="allow defect images without masks; pixel metrics are then skipped")
    test.add_argument("--out", metavar="DIR", help="where to write results (default: RUN/test)")
    test.add_argument("--batch-size", type=int, help="images per batch (default: the run's)")
    test.add_argument("--no-overlays", action="store_true", help="do not write heat-map overlay images (the report then shows none)")
    _add_device(test)
    test.set_defaults(func=cmd_test)

    predict = sub.add_parser("predict", help="score new images: score, verdict and optional heat map per image",
                             description="Score images (files or folders of images) with a fitted run. The verdict "
                                         "compares the score with the run's calibrated threshold; normalized_score is "
                                         "score / threshold (above 1 = anomalous).")
    predict.add_argument("run", metavar="RUN", help="run folder written by `defectscope fit`")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    predict.add_argument("--format", choices=["json", "csv"], default="json", help="output format (default: %(default)s)")
    predict.add_argument("--out", metavar="FILE", help="write results to FILE instead of standard output")
    predict.add_argument("--heatmaps", metavar="DIR", help="also write a heat-map overlay per image to DIR")
    predict.add_argument("--batch-size", type=int, help="images per batch (default: the run's)")
    _add_device(predict)
    predict.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="fit and test PatchCore on the bundled example (a small MVTec AD bottle subset)",
                          description="Fit the default detector on the bundled example and test it, writing the model "
                                      "and a report folder.")
    demo.add_argument("--out", default="demo-run", metavar="DIR", help="output folder (default: %(default)s)")
    demo.add_argument("--data", metavar="DIR", help="use another MVTec-layout category folder instead of the example")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DefectscopeError as exc:
        print(f"defectscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
