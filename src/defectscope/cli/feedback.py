"""``defectscope feedback export``: the operator feedback of the inspection log as MVTec-layout folders."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from ..errors import DefectscopeError
from .common import add_overwrite, info


def _locate(db: str | None, data_dir: str | None) -> tuple[str | None, Path]:
    """The database URL and the data folder: a SQLite log's folder is the data folder unless given."""
    from ..serve.store import database_url

    if data_dir is not None:
        return db, Path(data_dir).expanduser()
    if db is None:
        raise DefectscopeError("give --db URL or --data-dir DIR (the data folder of `defectscope serve`)")
    url = database_url(db, ".")
    if url.get_backend_name() != "sqlite":
        raise DefectscopeError(
            "--data-dir DIR is needed with a PostgreSQL --db: the folder where the service keeps the images"
        )
    return db, Path(url.database or ".").expanduser().parent


def run_export(args: argparse.Namespace) -> int:
    from ..serve.export import export_feedback
    from ..serve.store import InspectionLog

    url, data_dir = _locate(args.db, args.data_dir)
    with InspectionLog(url, data_dir, create=False) as log:
        summaries = export_feedback(log, args.out, model=args.model, everything=args.all, overwrite=args.overwrite)
    for summary in summaries:
        for note in summary.notes:
            info(f"note: {note}")
        print(summary.describe())
    if not summaries:
        which = f" for {args.model}" if args.model else ""
        again = "" if args.all else " (--all exports everything again)"
        print(f"no feedback waiting to be exported{which}{again}")
    return 0


def add_parser(sub: Any) -> None:
    feedback = sub.add_parser(
        "feedback",
        help="use the operator feedback of the inspection service (export it for fit and calibrate)",
        description="Use what operators said about the service's inspections.",
    )
    actions = feedback.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="write the feedback not exported yet in MVTec layout, one category folder per model",
        description=textwrap.dedent(
            """\
            Write the operator feedback not exported yet (each inspection's latest word) under OUT,
            one category folder per served model, and mark it exported:

              OUT/MODEL/test/TYPE/ID.png + ground_truth/TYPE/ID_mask.png   defects with a mask
              OUT/MODEL/defects_without_masks/TYPE/ID.png                  defects without one
              OUT/MODEL/good/ID.png                                        false alarms, confirmed good

            Then: defectscope fit DATA --labelled-defects K --defects-from OUT/MODEL (DMAD), or
            defectscope calibrate RUN --good OUT/MODEL/good [--defects OUT/MODEL/test/TYPE ...].
            Use a new OUT for each round: calibrate refuses images it has already counted."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument(
        "--db",
        metavar="URL",
        help="the service's database: sqlite:///FILE (or a file path) or postgresql://USER@HOST/DATABASE "
        "(default: the SQLite file in --data-dir)",
    )
    export.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the service's data folder, holding the stored images (default: the folder of a SQLite --db)",
    )
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write the export into")
    export.add_argument("--model", metavar="NAME", help="export only this served model's feedback")
    export.add_argument(
        "--all", action="store_true", help="export all feedback again, also what an earlier export wrote"
    )
    add_overwrite(export, "the export")
    export.set_defaults(func=run_export)
