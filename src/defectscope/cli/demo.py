"""``defectscope demo``: fit and test the default method on the bundled example."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..outputs import prepare_output_dir
from ..runs import evaluate_run, fit_run
from .common import add_overwrite, info
from .evaluation import print_result

EXAMPLE_DATA = Path(__file__).resolve().parents[3] / "examples" / "bottle_small"


def run(args: argparse.Namespace) -> int:
    data = Path(args.data) if args.data else EXAMPLE_DATA
    if not data.is_dir():
        raise DataError(f"{data}: bundled example not found; pass --data CATEGORY_DIR")
    out = prepare_output_dir(args.out, overwrite=args.overwrite, what="demo")
    fitted = fit_run(data, out / "model", overwrite=True, log=info)
    info(
        f"fitted in {fitted.info.fit_seconds:.1f} s; threshold {fitted.threshold:.4g}"
        if fitted.threshold
        else "fitted (no held-out images, no threshold)"
    )
    result = evaluate_run(out / "model", data, out=out / "test", overwrite=True, log=info, detector=fitted.detector)
    print_result(result)
    print(f"demo done: model in {out / 'model'}; open {out / 'test' / 'report.html'} for the report")
    return 0


def add_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="fit and test PatchCore on the bundled example (a small MVTec AD bottle subset)",
        description="Fit the default detector on the bundled example and test it, writing the model "
        "and a report folder (a folder written by an earlier demo is replaced).",
    )
    demo.add_argument("--out", default="demo-run", metavar="DIR", help="output folder (default: %(default)s)")
    demo.add_argument("--data", metavar="DIR", help="use another MVTec-layout category folder instead of the example")
    add_overwrite(demo, "into a folder holding other files")
    demo.set_defaults(func=run)
