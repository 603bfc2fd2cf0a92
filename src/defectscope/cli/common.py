"""What every command shares: argument types checked up front, the device option, printing."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..records import EXIT_IMAGES_ERRORED

if TYPE_CHECKING:
    from ..engines import EngineChoice


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    return _whole_number(text, 0)


def parse_number(text: str, what: str = "a number") -> float:
    """``text`` as a float, or an argparse error saying that ``what`` was expected."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _number(text: str) -> float:
    value = parse_number(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1 (a rate)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (e.g. 0.05), got {text}")
    return value


def sigmas(text: str) -> float:
    """An argparse type: a number of standard deviations in [0, 10]."""
    value = _number(text)
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be in [0, 10], got {text}")
    return value


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu (default) or cuda / cuda:N when a GPU exists"
    )


def add_engine(parser: argparse.ArgumentParser, distributed: str = "") -> None:
    """--engine and what goes with it (:class:`~defectscope.engines.EngineChoice`); with ``distributed``
    (what the command does on Ray, for its help) also ``--engine ray`` and its options."""
    from ..engines import ENGINES

    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        choices=(*ENGINES, "ray") if distributed else ENGINES,
        default="torch",
        help="what computes the predictions: torch (the model itself, default), onnxruntime or openvino (its "
        "exported ONNX graph: RUN/model.onnx if `defectscope export` wrote it, else exported in memory)"
        + (f"; ray: a Ray cluster, one model per worker, {distributed}" if distributed else ""),
    )
    if distributed:
        group.add_argument(
            "--address",
            metavar="ADDR",
            help="with --engine ray: a running cluster (auto, ray://HOST:PORT); default: a local Ray runtime",
        )
        group.add_argument(
            "--workers", type=positive_int, default=2, metavar="N", help="with --engine ray: model workers (default: 2)"
        )
        group.add_argument(
            "--threads-per-worker",
            type=positive_int,
            default=1,
            metavar="N",
            help="with --engine ray: CPUs (torch threads) per worker (default: 1)",
        )
        group.add_argument(
            "--worker-engine",
            choices=ENGINES,
            default="torch",
            help="with --engine ray: what computes the predictions in each worker (default: torch)",
        )
    group.add_argument(
        "--int8", action="store_true", help="use the int8 graph (backbone quantised; RUN/model.int8.onnx)"
    )
    group.add_argument(
        "--whole-graph",
        action="store_true",
        help="run the whole graph in the engine; by default PatchCore hands its patch embeddings to faiss, "
        "whose inverted-file search is faster on a CPU than the graph's matrix products (same results)",
    )
    group.add_argument("--exported", metavar="FILE", help="an exported .onnx file of this run to use instead")


def engine_choice(args: argparse.Namespace) -> EngineChoice:
    """The engine the command line asked for."""
    from ..engines import EngineChoice

    name = args.worker_engine if args.engine == "ray" else args.engine
    return EngineChoice(name, int8=args.int8, whole_graph=args.whole_graph, exported=args.exported)


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"write {what} even where that replaces files defectscope did not write",
    )


def info(message: str) -> None:
    """A progress sentence for the person at the terminal (stderr, so stdout stays machine-readable)."""
    print(message, file=sys.stderr)


def metrics_table(metrics: dict[str, float]) -> str:
    if not metrics:
        return "no metrics (see the notes above)"
    width = max(len(k) for k in metrics)
    rows = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
    rows += [f"{k.ljust(width)}  {v:.4f}" for k, v in metrics.items()]
    return "\n".join(rows)


def exit_status(n_errors: int, n_images: int) -> int:
    """0, or EXIT_IMAGES_ERRORED after saying that some images could not be judged."""
    if not n_errors:
        return 0
    info(
        f"defectscope: {n_errors} of {n_images} image(s) got the verdict error (non-finite score); "
        f"see their 'reason'. Exit status {EXIT_IMAGES_ERRORED}."
    )
    return EXIT_IMAGES_ERRORED
