"""A predictions file written as results arrive (JSON Lines or CSV), so a crash keeps what was finished.

Each batch of records is appended and flushed to disk (``fsync``) before the next is asked for; a
rerun reads the paths already in the file and scores only the others. A last line cut off by a
crash is dropped on reading and rewritten. The format follows the suffix: ``.jsonl`` (one JSON
record per line, the default) or ``.csv`` (the header of ``defectscope predict --format csv``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..outputs import json_safe
from ..records import Record, format_records, looks_like_records

FORMATS = {".jsonl": "jsonl", ".csv": "csv"}


def results_format(path: Path) -> str:
    """``jsonl`` or ``csv`` from the file name; a one-line error for anything else."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: write distributed results to a .jsonl or .csv file (one record per line)")
    return fmt


class ResultsFile:
    """Appends records to ``path``; :attr:`done` holds the image paths it already has."""

    def __init__(self, path: Path, *, resume: bool = True) -> None:
        self.path, self.fmt = path, results_format(path)
        self.done: set[str] = set()
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; expected a file name to write the results to")
        if path.exists() and path.stat().st_size:
            text = path.read_text(encoding="utf-8", errors="replace")
            if not resume:
                raise OutputError(f"{path}: exists; pass --overwrite to score every image again")
            self.done, complete = self._read(text)
            if complete != len(text.encode("utf-8")):  # a line cut off mid-write
                with path.open("r+b") as handle:
                    handle.truncate(complete)

    def _read(self, text: str) -> tuple[set[str], int]:
        """Paths of the complete records in ``text`` and the byte length of those complete lines."""
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        if self.fmt == "csv":
            if not lines or not looks_like_records(lines[0]):
                raise OutputError(f"{self.path}: exists and is not a defectscope predictions file; choose another")
            done = {row["path"] for row in csv.DictReader(io.StringIO("".join(lines)))}
        else:
            done = set()
            for number, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except ValueError:
                    raise OutputError(f"{self.path}, line {number}: not a JSON record; choose another file") from None
                if not isinstance(row, dict) or "verdict" not in row or "path" not in row:
                    raise OutputError(f"{self.path}, line {number}: not a defectscope record; choose another file")
                done.add(row["path"])
        return done, len("".join(lines).encode("utf-8"))

    def append(self, records: list[Record]) -> None:
        if not records:
            return
        if self.fmt == "csv":
            text = format_records(records, "csv")
            if self.path.exists() and self.path.stat().st_size:
                text = text.split("\n", 1)[1]  # the header is written once
        else:
            text = "".join(json.dumps(json_safe(r.to_dict(False)), allow_nan=False) + "\n" for r in records)
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write results ({exc.strerror or exc})") from None
        self.done.update(r.path for r in records)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results file as dicts (CSV values stay text)."""
    text = path.read_text(encoding="utf-8")
    if results_format(path) == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
