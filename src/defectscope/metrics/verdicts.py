"""What the verdicts of a labelled test set did: false alarms, misses, confusion counts.

An image whose verdict is ``error`` (score not trusted) is not passed as good, so it counts as
flagged: a false alarm when it was good, caught when it was a defect. The counts say how many
errors there were.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..records import Record
from ..thresholds import RateEstimate, describe_rate


def verdict_summary(records: Iterable[Record]) -> dict[str, Any] | None:
    """Confusion counts, false-alarm and miss rates (overall and per defect type) with their
    95 % intervals; None when the records carry no verdicts (a model without a threshold)."""
    judged = [r for r in records if r.threshold is not None and r.verdict is not None and r.label is not None]
    if not judged:
        return None
    good = [r for r in judged if r.label == 0]
    defects = [r for r in judged if r.label == 1]
    false_alarms = sum(r.verdict != "good" for r in good)
    missed = sum(r.verdict == "good" for r in defects)
    counts = {
        "true_positive": len(defects) - missed,
        "false_positive": false_alarms,
        "true_negative": len(good) - false_alarms,
        "false_negative": missed,
        "errors": sum(r.verdict == "error" for r in judged),
    }
    by_type: dict[str, dict[str, Any]] = {}
    for name in sorted({r.defect_type or "defect" for r in defects}):
        of_type = [r for r in defects if (r.defect_type or "defect") == name]
        by_type[name] = RateEstimate(sum(r.verdict == "good" for r in of_type), len(of_type)).to_dict()
    return {
        "counts": counts,
        "accuracy": (len(judged) - false_alarms - missed) / len(judged),
        "false_alarms": RateEstimate(false_alarms, len(good)).to_dict(),
        "misses": RateEstimate(missed, len(defects)).to_dict(),
        "misses_by_type": by_type,
    }


def describe_verdicts(summary: dict[str, Any]) -> list[str]:
    """The summary as lines for people."""
    counts = summary["counts"]

    def rate(entry: dict[str, Any]) -> str:
        return describe_rate(entry) if entry["n"] else "n/a (none in the test set)"

    lines = [
        f"false alarms (good judged anomalous): {rate(summary['false_alarms'])}",
        f"misses (defects judged good):         {rate(summary['misses'])}",
    ]
    lines += [f"  misses, {name}: {rate(entry)}" for name, entry in summary["misses_by_type"].items()]
    lines.append(
        f"confusion: {counts['true_positive']} caught, {counts['false_negative']} missed, "
        f"{counts['true_negative']} passed, {counts['false_positive']} false alarms"
        + (f" ({counts['errors']} verdict error, counted as flagged)" if counts["errors"] else "")
        + f"; accuracy {summary['accuracy']:.1%}"
    )
    return lines
