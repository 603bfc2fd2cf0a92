"""The ``defectscope`` command: fit, test, predict and demo."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence


from . import __version__
from .data import IMAGE_EXTENSIONS, ImageDataset, Sample, iterate_batches
from .data.sources import pick_labelled_defects, resolve_categories, training_samples
from .errors import DataError, DefectscopeError
from .cli_synth import add_synth_parser
from .cli_test import cmd_test, format_records
from .methods import METHODS, load
from .methods.trained import TrainedDetector
from .report.overlay import display_max, overlay

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
    category_dirs = resolve_categories(args.data, args.category, args.categories)
    samples = [s for d in category_dirs for s in training_samples(d)]
    detector = METHODS[args.method](**params).to(args.device)
    defects = []
    if args.labelled_defects:
        if not detector.uses_labelled_defects:
            raise DefectscopeError(f"--labelled-defects: {args.method} learns from good images only "
                                   f"(methods that use labelled defects: {', '.join(_defect_methods())})")
        defects = pick_labelled_defects(category_dirs, args.labelled_defects, detector.seed, args.defects_from)
        origin = args.defects_from or "each category's test split"
        print(f"using {args.labelled_defects} labelled defect image(s) per category from {origin}; "
              "`defectscope test` leaves them out of the evaluation", file=sys.stderr)
    where = ", ".join(str(d) for d in category_dirs)
    print(f"fitting {detector!r}\n  on {len(samples)} good images from {where}", file=sys.stderr)
    if isinstance(detector, TrainedDetector):
        detector.fit(samples, defects=defects, checkpoint_dir=Path(args.out) / "checkpoint", resume=args.resume)
    elif args.resume:
        raise DefectscopeError(f"--resume: {args.method} is not trained in epochs, there is nothing to resume")
    else:
        detector.fit(samples, defects=defects)
    # Absolute but not resolved: category names are folder names, also when those are symlinks.
    detector.fit_info["category_dirs"] = [os.path.abspath(d) for d in category_dirs]
    detector.fit_info["data"] = detector.fit_info["category_dirs"][0] if len(category_dirs) == 1 else None
    out = detector.save(args.out)
    info = detector.fit_info
    threshold = f"{detector.calibration.threshold:.4g}" if detector.calibration else "none (no held-out images)"
    print(f"fitted in {info['fit_seconds']:.1f} s on {info['n_fit_images']} images; threshold {threshold} "
          f"from {info['n_calibration_images']} held-out good images\nsaved to {out}")
    return 0


def _defect_methods() -> list[str]:
    return [name for name, cls in METHODS.items() if cls.uses_labelled_defects]


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
    text = format_records(records, args.format)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {len(records)} predictions to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


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
    fit.add_argument("data", metavar="DATA", nargs="+", help="an MVTec-layout category folder (uses train/good), a "
                     "dataset root holding categories (with --category / --categories) or a plain folder of good "
                     "images; several DATA folders train one unified model over all of them")
    fit.add_argument("--out", required=True, metavar="RUN", help="run folder to write the model to")
    fit.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="detection method (default: %(default)s)")
    fit.add_argument("--category", help="category to use when DATA is a root holding several")
    fit.add_argument("--categories", metavar="all|A,B", help="one unified model over these categories of the root "
                     "DATA (all of them with 'all'); `test` then reports each category and the mean")
    fit.add_argument("--labelled-defects", type=int, metavar="K", help="semi-supervised: also learn from K defect "
                     "images (with masks) per category, taken from --defects-from or else from the test split "
                     "(those are then left out of `test`)")
    fit.add_argument("--defects-from", metavar="DIR", help="MVTec-layout category (or root of categories) to take "
                     "the labelled defects from")
    fit.add_argument("--backbone", help="feature extractor: mobilenet_v2, efficientnet_lite0 (default), resnet18, wide_resnet50_2")
    fit.add_argument("--weights", help="explicit backbone weights file (else $DEFECTSCOPE_WEIGHTS_DIR, installed packages, download)")
    fit.add_argument("--image-size", type=int, help="square input size in pixels, multiple of 16 "
                     "(default: the method's own, 256 for the feature-based ones; see below)")
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
                      "ground_truth/); default: the folder(s) the run was fitted on")
    test.add_argument("--category", help="category to use when DATA is a root holding several")
    test.add_argument("--categories", metavar="all|A,B", help="test these categories of the root DATA, each on its "
                      "own plus the mean")
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
    add_synth_parser(sub)
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
