"""The report's tables: the model that was tested, the metrics, and how each defect type fared."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..metrics import auroc
from ..records import Record
from .text import esc, fmt, pct

#: Facts of ``summary["model"]`` in the order shown: key, label, how the value reads.
_MODEL_FACTS: tuple[tuple[str, str, Any], ...] = (
    ("method", "method", str),
    ("backbone", "backbone", str),
    ("image_size", "image size", lambda v: f"{v} px"),
    ("geometry", "geometry", str),
    ("n_fit_images", "fitted on", lambda v: f"{v} good image{'s' if v != 1 else ''}"),
    ("fitted_at", "fitted", lambda v: _when(v)),
    ("categories", "categories", lambda v: ", ".join(map(str, v)) if v else "none recorded"),
    ("defectscope_version", "defectscope", str),
    ("engine", "engine", lambda v: _engine(v)),
)


def _engine(facts: dict[str, Any]) -> str:
    """ "torch", or e.g. "onnxruntime (int8; whole graph; model.onnx)"."""
    name = str(facts.get("engine", "torch"))
    if name == "torch":
        return name
    parts = ["int8"] if facts.get("int8") else []
    parts += [f"graph {facts['graph']}"] if facts.get("graph") else []
    parts += [str(facts["exported"])] if facts.get("exported") else []
    return f"{name} ({'; '.join(parts)})" if parts else name


def _when(value: str) -> str:
    """An ISO 8601 time as "2025-03-01 14:05 UTC" (as given where it does not parse)."""
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return str(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M") + (" UTC" if moment.tzinfo is not None else "")


def model_table(model: dict[str, Any] | None) -> str:
    """What was tested, as ``summary["model"]`` records it; facts it lacks are left out."""
    rows = [
        f'<tr data-fact="{key}"><th class="row">{esc(label)}</th><td>{esc(show(model[key]))}</td></tr>'
        for key, label, show in _MODEL_FACTS
        if model and model.get(key) is not None
    ]
    if not rows:
        return ""
    return f'<table class="metrics model" id="model"><caption>Model</caption>{"".join(rows)}</table>'


def metrics_table(metrics: dict[str, float]) -> str:
    rows = "".join(f'<tr><td>{esc(k)}</td><td class="value">{fmt(v)}</td></tr>' for k, v in metrics.items())
    return f'<table class="metrics" id="metrics"><tr><th>metric</th><th>value</th></tr>{rows}</table>'


def _type_auroc(defects: Sequence[Record], good: Sequence[Record]) -> float | None:
    """Image AUROC of one defect type against every good image; None where undefined."""
    scored = [r for r in [*defects, *good] if math.isfinite(r.score)]
    labels = [r.label for r in scored]
    if 0 not in labels or 1 not in labels:
        return None
    return auroc(labels, [r.score for r in scored])


def defect_types_table(records: Sequence[Record], threshold: float | None) -> str:
    """Per defect type: images, image AUROC against all good images, recall at the threshold; and
    the good images' false alarms. An image with the verdict error counts as flagged."""
    good = [r for r in records if r.label == 0]
    defects = [r for r in records if r.label == 1]
    if not defects and not good:
        return ""
    judged = threshold is not None

    def at_threshold(flagged: int, n: int, what: str) -> str:
        if not judged:
            return '<td class="value">n/a</td>'
        return f'<td class="value">{what} {pct(flagged / n if n else None)} ({flagged} / {n})</td>'

    rows = []
    for name in sorted({r.defect_type or "defect" for r in defects}):
        of_type = [r for r in defects if (r.defect_type or "defect") == name]
        caught = sum(r.verdict != "good" for r in of_type)
        area = _type_auroc(of_type, good)
        rows.append(
            f'<tr data-defect-type="{esc(name)}"><th class="row">{esc(name)}</th><td class="value">{len(of_type)}</td>'
            f'<td class="value">{fmt(area)}</td>{at_threshold(caught, len(of_type), "recall")}</tr>'
        )
    if good:
        alarms = sum(r.verdict != "good" for r in good)
        rows.append(
            f'<tr data-defect-type="good" class="good"><th class="row">good</th><td class="value">{len(good)}</td>'
            f'<td class="value"></td>{at_threshold(alarms, len(good), "false alarms")}</tr>'
        )
    return (
        '<table class="metrics" id="defect-types"><tr><th>defect type</th><th>images</th>'
        "<th>image AUROC vs good</th><th>at the threshold</th></tr>" + "".join(rows) + "</table>"
    )
