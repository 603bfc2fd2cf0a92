"""``defectscope test``: evaluate a run on labelled test images (the command is named ``test``)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..evaluate import PIXEL_RESOLUTIONS
from ..metrics.verdicts import describe_verdicts
from ..runs import EvalResult, evaluate_run
from ..thresholds import describe_calibration
from .common import (
    add_device,
    add_engine,
    add_overwrite,
    engine_choice,
    exit_status,
    info,
    metrics_table,
    positive_int,
)


def print_result(result: EvalResult) -> None:
    """The metrics table(s) on stdout, notes on stderr."""
    for part in result.parts:
        if part.name:
            info(f"\n== {part.name} ==")
        for note in part.notes:
            info(f"note: {note}")
        print(metrics_table(part.metrics))
        if part.calibration is not None:
            print(describe_calibration(part.calibration))
        if part.verdicts is not None:
            print("\n".join(describe_verdicts(part.verdicts)))
        print(
            f"{part.images_per_second:.1f} images/s; wrote {part.report}, {part.folder / 'metrics.json'}, "
            f"{part.folder / 'predictions.csv'}"
            + (f", {part.folder / 'overlays'}/" if any(r.overlay for r in part.records) else "")
        )
    if len(result.parts) > 1:
        mean = result.mean_metrics
        width = max(len(p.name or "") for p in [*result.parts]) if result.parts else 4
        width = max(width, 4)
        shown = [k for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro") if k in mean]
        print("\n" + "category".ljust(width) + "".join(f"  {k:>11}" for k in shown))
        for part in result.parts:
            print((part.name or "").ljust(width) + "".join(f"  {part.metrics.get(k, math.nan):11.4f}" for k in shown))
        print("mean".ljust(width) + "".join(f"  {mean[k]:11.4f}" for k in shown))
        print(f"wrote {result.folder / 'metrics.json'} and one report folder per category under {result.folder}")


def run(args: argparse.Namespace) -> int:
    ray = None
    if args.engine == "ray":
        from ..distributed.ray_inspect import RayOptions

        ray = RayOptions(args.address, args.workers, args.threads_per_worker, engine_choice(args))
    result = evaluate_run(
        args.run,
        args.data,
        category=args.category,
        categories=args.categories,
        good=args.good,
        defects=args.defects,
        masks=args.masks,
        image_level_only=args.image_level_only,
        out=args.out,
        overlays=not args.no_overlays,
        batch_size=args.batch_size,
        pixel_resolution=args.pixel_resolution,
        device=args.device,
        overwrite=args.overwrite,
        log=info,
        engine=None if ray else engine_choice(args),
        ray=ray,
    )
    print_result(result)
    return exit_status(result.n_errors, len(result.records))


def add_parser(sub: Any) -> None:
    test = sub.add_parser(
        "test",
        help="evaluate a run on labelled test images: metrics, CSV, heat maps",
        description="Score the test split, print image and pixel metrics, and write report.html "
        "(metrics, curves, score histogram, every image), metrics.json, "
        "predictions.csv and heat-map overlays (ground truth outlined in green). "
        "Exit status 3 when some image could not be judged (verdict error).",
    )
    test.add_argument("run", metavar="RUN", help="run folder written by `defectscope fit`")
    test.add_argument(
        "data",
        nargs="?",
        metavar="DATA",
        help="MVTec-layout category folder (uses test/ and "
        "ground_truth/), or a root holding the model's categories; default: the folder(s) the run "
        "was fitted on",
    )
    test.add_argument("--category", help="category to use when DATA is a root holding several")
    test.add_argument(
        "--categories", metavar="all|A,B", help="test these categories of the root DATA, each on its own plus the mean"
    )
    test.add_argument("--good", metavar="DIR", help="plain-folder test set: good images (instead of DATA)")
    test.add_argument("--defects", metavar="DIR", help="plain-folder test set: defect images")
    test.add_argument("--masks", metavar="DIR", help="plain-folder test set: masks named <stem>_mask.png or <stem>.png")
    test.add_argument(
        "--image-level-only",
        action="store_true",
        help="allow defect images without masks; pixel metrics are then skipped",
    )
    test.add_argument("--out", metavar="DIR", help="where to write results (default: RUN/test)")
    test.add_argument("--batch-size", type=positive_int, metavar="N", help="images per batch (default: the run's)")
    test.add_argument(
        "--pixel-resolution",
        choices=PIXEL_RESOLUTIONS,
        help="where pixel metrics compare maps and masks: native (each image's own size) or square (the "
        "input-size square of the papers' protocol); default: square for models fitted with the square resize, "
        "native for keep-aspect and tiles",
    )
    test.add_argument(
        "--no-overlays", action="store_true", help="do not write heat-map overlay images (the report then shows none)"
    )
    add_overwrite(test, "results into a folder holding other files")
    add_device(test)
    add_engine(
        test,
        distributed="the scored images sent back to make the metrics and the report here",
    )
    test.set_defaults(func=run)
