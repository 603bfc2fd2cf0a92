"""``defectscope predict``: score new images with a fitted run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..outputs import atomic_write, prepare_output_file
from ..records import NO_THRESHOLD_NOTE, format_records, looks_like_records
from ..runs import predict_run
from .common import add_device, add_engine, add_overwrite, engine_choice, exit_status, info, positive_int


def _check_out(path: str, overwrite: bool) -> Path:
    """``--out`` may replace an earlier predictions file, any other file only with ``--overwrite``."""
    target = prepare_output_file(path)
    if target.is_file() and not overwrite:
        try:
            ours = looks_like_records(target.read_text(encoding="utf-8", errors="strict"))
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise OutputError(
                f"{target}: exists and is not a defectscope predictions file; pass --overwrite to replace it"
            )
    return target


def _run_ray(args: argparse.Namespace) -> int:
    from ..distributed import predict_ray

    if not args.out:
        raise OutputError("--engine ray writes its results to a file: pass --out FILE.jsonl or FILE.csv")
    if args.heatmaps:
        raise OutputError("--engine ray writes records only; leave out --heatmaps (or use another engine)")
    result = predict_ray(
        args.run,
        args.paths,
        args.out,
        address=args.address,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        batch_size=args.batch_size,
        device=args.device,
        engine=engine_choice(args),
        overwrite=args.overwrite,
        log=info,
    )
    info(f"wrote {len(result.scored)} predictions to {result.out} ({result.skipped} already there)")
    return exit_status(result.n_errors, len(result.scored))


def run(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return _run_ray(args)
    out = _check_out(args.out, args.overwrite) if args.out else None
    result = predict_run(
        args.run,
        args.paths,
        heatmaps=args.heatmaps,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        engine=engine_choice(args),
        log=info,
    )
    if result.records and result.records[0].threshold is None:
        info(f"note: {NO_THRESHOLD_NOTE}")
    text = format_records(result.records, args.format)
    if out is not None:
        atomic_write(out, text)
        info(f"wrote {len(result.records)} predictions to {out}")
    else:
        sys.stdout.write(text)
    return exit_status(result.n_errors, len(result.records))


def add_parser(sub: Any) -> None:
    predict = sub.add_parser(
        "predict",
        help="score new images: score, verdict and optional heat map per image",
        description="Score images with a fitted run: image files, folders of images (not "
        "walked into sub-folders), or MVTec-layout category folders (their test "
        "images). The verdict compares the score with the run's calibrated "
        "threshold; normalized_score is score / threshold (above 1 = anomalous). "
        "A score that is not a finite number gets the verdict error, and the "
        "command then exits with status 3.",
    )
    predict.add_argument("run", metavar="RUN", help="run folder written by `defectscope fit`")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders of images or category folders")
    predict.add_argument(
        "--format", choices=["json", "csv"], default="json", help="output format (default: %(default)s)"
    )
    predict.add_argument(
        "--out",
        metavar="FILE",
        help="write results to FILE instead of standard output "
        "(replaces an earlier predictions file; any other file only with --overwrite)",
    )
    predict.add_argument("--heatmaps", metavar="DIR", help="also write a heat-map overlay per image to DIR")
    predict.add_argument("--batch-size", type=positive_int, metavar="N", help="images per batch (default: the run's)")
    add_overwrite(predict, "the results file or heat maps")
    add_device(predict)
    add_engine(
        predict,
        distributed="results appended to --out as they arrive (a rerun skips the images already there)",
    )
    predict.set_defaults(func=run)
