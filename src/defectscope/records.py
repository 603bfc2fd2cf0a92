"""One record per scored image, the same for ``predict`` and ``test``, and the verdict rule.

A verdict is ``good`` or ``anomalous`` against the model's calibrated threshold, ``error`` when
the score cannot be trusted (not a finite number), and ``None`` when the model has no
threshold. A score that cannot be trusted is never judged ``good``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .outputs import json_safe

Verdict = Literal["good", "anomalous", "error"]
#: Exit status of a command that finished but could not judge some images (verdict ``error``).
EXIT_IMAGES_ERRORED = 3


#: Said wherever a model without a calibrated threshold scores images.
NO_THRESHOLD_NOTE = (
    "this model has no calibrated threshold (no good images were held out when it was fitted), "
    "so no image gets a verdict; fit it on at least 2 good images"
)


def judge(score: float, threshold: float | None) -> tuple[Verdict | None, str | None]:
    """The verdict of one score and, for ``error``, the reason."""
    if not math.isfinite(score):
        return "error", f"the anomaly score is not a finite number ({score})"
    if threshold is None:
        return None, None
    return ("anomalous" if score > threshold else "good"), None


@dataclass
class Record:
    """What a run says about one image.

    ``overlay`` is the heat-map overlay written for it (None when none was written); ``label``
    and ``defect_type`` are known for labelled test images only.
    """

    path: str
    category: str | None
    score: float
    normalized_score: float | None
    verdict: Verdict | None
    threshold: float | None
    max_pixel_score: float
    #: The rule that set the threshold (``conformal``, ``mean_sigma``, ``recall``).
    rule: str | None = None
    overlay: str | None = None
    label: int | None = None
    defect_type: str | None = None
    reason: str | None = None
    #: What computed the score: ``torch``, ``onnxruntime``, ``openvino`` (``-int8`` for a quantised graph).
    engine: str | None = None

    @classmethod
    def of(
        cls,
        path: str,
        category: str | None,
        score: float,
        max_pixel_score: float,
        threshold: float | None,
        *,
        label: int | None = None,
        defect_type: str | None = None,
        rule: str | None = None,
        engine: str | None = None,
    ) -> Record:
        verdict, reason = judge(score, threshold)
        normalized = score / threshold if threshold is not None and verdict != "error" else None
        return cls(
            path,
            category,
            score,
            normalized,
            verdict,
            threshold,
            max_pixel_score,
            rule=rule if threshold is not None else None,
            label=label,
            defect_type=defect_type,
            reason=reason,
            engine=engine,
        )

    @property
    def anomalous(self) -> bool | None:
        """True / False for a verdict against the threshold, None for ``error`` or no threshold."""
        return None if self.verdict in (None, "error") else self.verdict == "anomalous"

    def to_dict(self, labelled: bool) -> dict[str, Any]:
        """The record as written: ``labelled`` (test) records carry label and defect type."""
        out = asdict(self)
        if not labelled:
            out.pop("label")
            out.pop("defect_type")
        return out


def _columns(labelled: bool) -> list[str]:
    return [f.name for f in fields(Record) if labelled or f.name not in ("label", "defect_type")]


def format_records(records: list[Record], fmt: str, labelled: bool = False) -> str:
    """Records as JSON (strict: no bare NaN) or CSV text with a fixed header."""
    rows = [r.to_dict(labelled) for r in records]
    if fmt == "json":
        return json.dumps(json_safe(rows), indent=2, allow_nan=False) + "\n"
    if fmt != "csv":
        raise ValueError(f"unknown record format {fmt!r}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(labelled), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def looks_like_records(text: str) -> bool:
    """Whether ``text`` is a predictions file defectscope wrote (JSON list of records or our CSV header)."""
    first = text.lstrip()[:1]
    if first == "[":
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "verdict" in v for v in value)
    header = text.splitlines()[0] if text else ""
    return header in [",".join(c) for c in (*_HEADERS_BEFORE, _columns(False), _columns(True))]


#: CSV headers of earlier versions (before the ``rule`` and ``engine`` columns), still recognised as ours.
_HEADERS_BEFORE = [
    [c for c in _columns(labelled) if c not in dropped]
    for labelled in (False, True)
    for dropped in (("engine",), ("rule", "engine"))
]
