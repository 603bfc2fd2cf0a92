"""``defectscope calibrate``: set a fitted run's threshold again from more images, without re-fitting."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from ..runs import calibrate_run
from ..thresholds import RULES
from .common import add_device, fraction, info, positive_int, sigmas


def run(args: argparse.Namespace) -> int:
    result = calibrate_run(
        args.run,
        args.good,
        args.defects,
        rule=args.rule,
        false_alarm_rate=args.false_alarm_rate,
        sigmas=args.sigmas,
        target_recall=args.target_recall,
        confidence=args.confidence,
        replace_scores=args.replace,
        batch_size=args.batch_size,
        device=args.device,
        log=info,
    )
    for note in result.after.notes:
        info(f"note: {note}")
    before = result.before.describe() if result.before is not None else "none"
    print(f"before: {before}\nnow:    {result.after.describe()}\nsaved to {result.folder / 'config.json'}")
    return 0


def add_parser(sub: Any) -> None:
    calibrate = sub.add_parser(
        "calibrate",
        help="re-set a run's decision threshold from more good (and defect) images, without re-fitting",
        description=textwrap.fill(
            "Set the decision threshold of a fitted run again: from its stored held-out scores plus the "
            "scores of new good images (--good, e.g. parts an operator confirmed) and labelled defects "
            "(--defects), with the model's threshold rule or the one given. The images must be new to the "
            "model; `test` leaves them out afterwards. Only RUN/config.json changes (atomically); the "
            "replaced threshold is kept in its calibration_history.",
            width=100,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate.add_argument("run", metavar="RUN", help="run folder written by `defectscope fit`")
    calibrate.add_argument(
        "--good", nargs="+", default=[], metavar="PATH", help="good image files or folders the model has not seen"
    )
    calibrate.add_argument(
        "--defects",
        nargs="+",
        default=[],
        metavar="PATH",
        help="defect image files or folders (folder name = defect type) the model has not seen: they "
        "measure the miss rate at the threshold, or set it with --target-recall",
    )
    calibrate.add_argument("--rule", choices=RULES, help="threshold rule (default: the model's own)")
    calibrate.add_argument(
        "--false-alarm-rate",
        type=fraction,
        metavar="A",
        help="conformal rule: bound the share of good images judged anomalous by A",
    )
    calibrate.add_argument(
        "--confidence",
        type=fraction,
        metavar="C",
        help="conformal rule: keep this calibration's false-alarm rate under A with probability C "
        "(e.g. 0.9), not only on average; needs more held-out images",
    )
    calibrate.add_argument(
        "--target-recall", type=fraction, metavar="R", help="recall rule: catch at least the share R of defects"
    )
    calibrate.add_argument(
        "--sigmas", type=sigmas, metavar="S", help="mean_sigma rule: threshold = mean + S sd, at least the highest"
    )
    calibrate.add_argument(
        "--replace",
        action="store_true",
        help="drop the stored held-out scores and use only the new images (e.g. after the process changed)",
    )
    calibrate.add_argument("--batch-size", type=positive_int, metavar="N", help="images per batch (default: the run's)")
    add_device(calibrate)
    calibrate.set_defaults(func=run)
