"""What the inspection log holds: inspections and feedback as frozen records, and the cleaning
every value gets before it is written.

Non-finite numbers (a NaN score) are stored as NULL in both back ends: the verdict ``error`` and
its reason say what happened. Text is cut to its column's limit and freed of what some database
refuses (NUL, lone surrogates). Timestamps are timezone-aware UTC; naive ones given as filters
are taken to be UTC.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..outputs import json_safe

FEEDBACK_KINDS = ("confirmed_defect", "false_alarm", "missed_defect", "confirmed_good")
#: Feedback saying the part is defective (may carry a mask and a defect type) / good.
DEFECT_KINDS = ("confirmed_defect", "missed_defect")
GOOD_KINDS = ("false_alarm", "confirmed_good")
#: ``none``: the model has no calibrated threshold, so no verdict (``records.judge`` gives None).
VERDICTS = ("good", "anomalous", "error", "none")

_TEXT_LIMITS = {"filename": 1024, "reason": 2000, "note": 4000, "model": 200, "model_sha256": 200, "rule": 100}


@dataclass(frozen=True)
class Feedback:
    """An operator's judgement of one inspection."""

    id: int
    inspection_id: str
    kind: str
    created: datetime
    mask: str | None  # stored PNG (white = defect), any size
    defect_type: str | None
    note: str | None
    exported: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "inspection_id": self.inspection_id,
            "kind": self.kind,
            "created": self.created.isoformat(),
            "mask": self.mask,
            "defect_type": self.defect_type,
            "note": self.note,
            "exported": self.exported,
        }


@dataclass(frozen=True)
class InspectionIn:
    """What the service hands the log for one inspected image (files already stored)."""

    model: str
    model_sha256: str
    filename: str | None
    image: str  # stored file name of the input image
    map: str | None  # stored file name of the anomaly map (.npy float16, (H, W)), or None
    score: float | None
    normalized_score: float | None
    verdict: str  # good / anomalous / error, or none for a model without a threshold
    threshold: float | None
    rule: str | None
    max_pixel_score: float | None
    reason: str | None
    timings: dict[str, float]


@dataclass(frozen=True)
class Inspection(InspectionIn):
    """A logged inspection with its id, time and feedback (oldest first)."""

    id: str  # uuid4 hex
    created: datetime  # UTC, timezone-aware
    feedback: tuple[Feedback, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (non-finite numbers as None), without the file URLs the API adds."""
        return json_safe(
            {
                "id": self.id,
                "created": self.created.isoformat(),
                "model": self.model,
                "model_sha256": self.model_sha256,
                "filename": self.filename,
                "score": self.score,
                "normalized_score": self.normalized_score,
                "verdict": self.verdict,
                "threshold": self.threshold,
                "rule": self.rule,
                "max_pixel_score": self.max_pixel_score,
                "reason": self.reason,
                "timings": dict(self.timings),
                "feedback": [f.to_dict() for f in self.feedback],
            }
        )

    @property
    def latest_feedback(self) -> Feedback | None:
        """The operator's last word on this inspection (it supersedes earlier feedback)."""
        return self.feedback[-1] if self.feedback else None


# ---- cleaning values -----------------------------------------------------------------------------


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs as one space), at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).astimezone(UTC)


def finite(value: Any) -> float | None:
    """A finite float, or None (NaN / infinity are not stored; see the module docstring)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def clean_text(value: Any, field: str) -> str | None:
    """Text any database accepts (no NUL, no lone surrogates), cut to the field's limit."""
    if value is None:
        return None
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text[: _TEXT_LIMITS.get(field, 1024)]


# ---- rows and records ----------------------------------------------------------------------------


def timings_json(value: dict[str, float]) -> str:
    """The ``timings`` column of an inspection row (finite numbers only)."""
    return json.dumps(value, allow_nan=False, sort_keys=True)


def feedback_from_row(row: Any) -> Feedback:
    return Feedback(
        id=int(row.id),
        inspection_id=row.inspection_id,
        kind=row.kind,
        created=row.created,
        mask=row.mask,
        defect_type=row.defect_type,
        note=row.note,
        exported=bool(row.exported),
    )


def inspection_from_row(row: Any, feedback: Sequence[Feedback]) -> Inspection:
    return Inspection(
        model=row.model,
        model_sha256=row.model_sha256,
        filename=row.filename,
        image=row.image,
        map=row.map,
        score=row.score,
        normalized_score=row.normalized_score,
        verdict=row.verdict,
        threshold=row.threshold,
        rule=row.rule,
        max_pixel_score=row.max_pixel_score,
        reason=row.reason,
        timings=json.loads(row.timings),
        id=row.id,
        created=row.created,
        feedback=tuple(feedback),
    )
