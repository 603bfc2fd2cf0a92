"""Progress for the person at the terminal: progress bars (DEFECTSCOPE_NO_PROGRESS=1 silences them), log sentences."""

import os
from collections.abc import Callable

#: Where the run layer sends its progress sentences (the CLI prints them to stderr).
Log = Callable[[str], None]


def progress_enabled() -> bool:
    """True unless the environment asks for quiet output."""
    return os.environ.get("DEFECTSCOPE_NO_PROGRESS", "") in ("", "0")


def quiet(_: str) -> None:
    """A :data:`Log` that drops every sentence: the default for Python callers."""
