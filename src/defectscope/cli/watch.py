"""``defectscope watch``: judge every new image in a drop folder, log it like the service, optionally sort it."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..records import EXIT_IMAGES_ERRORED
from .common import add_device, add_engine, engine_choice, info, parse_number, positive_int
from .serve import DEFAULT_DATA_DIR

#: Exit status after SIGTERM (128 + 15), as a shell reports a process it terminated.
EXIT_TERMINATED = 143
EXIT_INTERRUPTED = 130


def seconds(text: str) -> float:
    """An argparse type: a poll interval, a finite number of seconds in (0, 3600]."""
    value = parse_number(text, "a number of seconds")
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 seconds, got {text}")
    return value


@contextmanager
def _stop_on_signals(stop: threading.Event, received: list[int]) -> Iterator[None]:
    """The first Ctrl-C (or SIGTERM) sets ``stop``: the watcher finishes the batch in hand and returns.

    A second one interrupts at once (KeyboardInterrupt). Outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def _shown(path: Path, folder: Path) -> str:
    """``path`` relative to the watched folder where it is inside it, printable on one line."""
    from . import one_line

    try:
        text = str(path.relative_to(folder))
    except ValueError:
        text = str(path)
    return one_line(text)


def run(args: argparse.Namespace) -> int:
    from ..serve.registry import ServedModel, parse_spec
    from ..serve.store import InspectionLog
    from ..serve.watch import FolderWatcher, WatchEvent, check_sortable, watched_folder
    from . import one_line

    watched_folder(args.dir)  # checked before the model loads and the log is made
    run_folder, name = parse_spec(args.run)
    model = ServedModel.load(run_folder, name, args.device, engine_choice(args), info)
    if args.sort:
        check_sortable(model)
    data_dir = Path(args.data_dir).expanduser()
    log = InspectionLog(args.db, data_dir)
    try:
        watcher = FolderWatcher(model, log, args.dir, sort=args.sort, batch_size=args.batch_size)
        folder = watcher.folder

        def report(event: WatchEvent) -> None:
            moved = f" -> {_shown(event.moved_to, folder)}" if event.moved_to is not None else ""
            if event.inspection is None:
                where = f"; moved to {_shown(event.moved_to, folder)}" if event.moved_to is not None else ""
                print(f"defectscope: error: {one_line(event.problem or '')}{where}", file=sys.stderr, flush=True)
                return
            row = event.inspection
            score = "nan" if row.score is None else f"{row.score:.4f}"
            reason = f"  ({one_line(row.reason)})" if row.reason else ""
            verdict = row.verdict or "none"  # a model without a threshold gives no verdict
            print(f"{verdict:<9}  {score:>9}  {_shown(event.path, folder)}{moved}  id={row.id}{reason}", flush=True)

        threshold = "no threshold" if model.threshold is None else f"threshold {model.threshold:.4g}"
        info(
            f"watching {folder} with {model.name} ({threshold}), logging to {log.where}; "
            + ("sorting into good/, anomalous/, error/; " if args.sort else "")
            + ("processing what is there" if args.once else "Ctrl-C stops")
        )
        stop = threading.Event()
        received: list[int] = []
        with _stop_on_signals(stop, received):
            counts = watcher.run(report, interval=args.interval, once=args.once, stop=stop)
    finally:
        log.close()
    summary = f"{counts.inspected} image(s) inspected" + "".join(
        f", {n} {verdict}" for verdict, n in sorted(counts.verdicts.items())
    )
    if counts.refused:
        summary += f"; {counts.refused} file(s) could not be used (see above)"
    info(summary)
    if received:
        info("defectscope: interrupted")
        return EXIT_TERMINATED if received[0] == signal.SIGTERM else EXIT_INTERRUPTED
    return EXIT_IMAGES_ERRORED if counts.errors or counts.refused else 0


def add_parser(sub: Any) -> None:
    watch = sub.add_parser(
        "watch",
        help="inspect every new image that appears in a folder (a camera's drop folder) and log it",
        description="Poll DIR and inspect each new image with RUN once it is complete (its size and time "
        "unchanged across two polls; writers that can should write under a temporary name, a dot-file, "
        "*.tmp or *.part, which is never touched, and rename the finished file in). Each image is logged "
        "like `defectscope serve` logs it (same database and data folder options) and printed as one line: "
        "verdict, score, file, id. With --sort it then moves into DIR/good/, DIR/anomalous/ or DIR/error/ "
        "(error: not judged or not an image); nothing is deleted or overwritten (a taken name gets a suffix). "
        "Without --sort files stay and each is judged once per watcher. Ctrl-C stops after the batch in hand "
        "(exit 130). With --once the exit status is 3 when some file could not be judged or used.",
    )
    watch.add_argument("run", metavar="RUN", help="run folder written by `defectscope fit` (RUN=NAME names it)")
    watch.add_argument("dir", metavar="DIR", help="the folder to watch (sub-folders are not read)")
    watch.add_argument(
        "--db",
        metavar="URL",
        help="inspection log, as for `defectscope serve`: sqlite:///FILE or postgresql://... "
        "(default: D/inspections.db)",
    )
    watch.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        metavar="D",
        help="where stored images and maps (and the default SQLite log) go (default: %(default)s)",
    )
    watch.add_argument("--sort", action="store_true", help="move each file into good/, anomalous/ or error/ under DIR")
    watch.add_argument(
        "--interval", type=seconds, default=0.5, metavar="S", help="seconds between polls (default: %(default)s)"
    )
    watch.add_argument("--once", action="store_true", help="process the files there now, then exit")
    watch.add_argument(
        "--batch-size", type=positive_int, metavar="N", help="images per model call (default: the run's)"
    )
    add_device(watch)
    add_engine(watch)
    watch.set_defaults(func=run)
