"""Whether progress bars are shown (set DEFECTSCOPE_NO_PROGRESS=1 to silence them, e.g. in logs)."""

import os


def progress_enabled() -> bool:
    """True unless the environment asks for quiet output."""
    return os.environ.get("DEFECTSCOPE_NO_PROGRESS", "") in ("", "0")
