"""The ``defectscope`` command: one small module per sub-command, all calling :mod:`defectscope.runs`.

Exit status: 0 done; 2 a problem with the input, files or arguments (one line on stderr naming
the file and the problem); 3 the command finished but some image got the verdict ``error``;
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

from .. import __version__
from ..errors import DefectscopeError
from . import calibrate, demo, evaluation, export, feedback, fit, generate, predict, serve, synth, watch


def one_line(text: str) -> str:
    """``text`` with control characters (a newline in a file name, terminal escapes) written as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line and exit status 2, like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"defectscope: error: {one_line(message.removeprefix('argument '))} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="defectscope",
        description="Industrial visual anomaly detection: fit on good images, then score, localise and judge new ones.",
    )
    parser.add_argument("--version", action="version", version=f"defectscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for module in (fit, evaluation, predict, calibrate, export, serve, watch, feedback, demo, synth, generate):
        module.add_parser(sub)
    return parser


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Any warning from a library reaches the user as one line, not as Python's two-line report."""
    text = " ".join(str(message).split())
    print(f"defectscope: note: {text} ({category.__name__})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2."""
    warnings.showwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0 as usual; a usage error returns 2
        if exc.code == 2:
            return 2
        raise
    try:
        return int(args.func(args))
    except DefectscopeError as exc:
        print(f"defectscope: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectscope: interrupted", file=sys.stderr)
        return 130
