"""What every command shares: argument types checked up front, the device option, printing."""

from __future__ import annotations

import argparse
import math
import sys


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu (default) or cuda / cuda:N when a GPU exists"
    )


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


def errored_note(n_errors: int, n_images: int) -> None:
    """Say that some images could not be judged (the command then exits with EXIT_IMAGES_ERRORED)."""
    info(
        f"defectscope: {n_errors} of {n_images} image(s) got the verdict error (non-finite score); "
        "see their 'reason'. Exit status 3."
    )
