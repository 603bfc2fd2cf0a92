"""The HTML test report: one self-contained page with the model tested, the verdicts at the
threshold, how each defect type fared, metrics, curves, a score histogram and every image.

The verdicts section comes from :mod:`.verdicts`, the tables from :mod:`.tables`, the plots (inline
SVG, no plotting dependency) from :mod:`.plots` and the image cards with their viewer from
:mod:`.cards`. Images are linked from the sibling ``overlays/`` folder that
:class:`.images.ReportImages` writes, so the page and that folder travel together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import atomic_write
from ..records import Record
from .cards import VIEWER, VIEWER_SCRIPT, VIEWER_SCRIPT_HASH, card, flag
from .overlay import RAMP
from .plots import colour_bar, histogram, line_plot
from .style import STYLE
from .tables import defect_types_table, metrics_table, model_table
from .text import esc, fmt
from .verdicts import threshold_label, verdicts_section

REPORT_FILE = "report.html"

#: The curve plots: key in ``curves``, title, axis labels, x range end, metric shown, its name.
_CURVES = (
    ("roc", "Image ROC", "false positive rate", "true positive rate", 1.0, "image_auroc", "AUROC"),
    ("pr", "Image precision-recall", "recall", "precision", 1.0, "image_ap", "AP"),
    ("pro", "Pixel per-region overlap", "false positive rate", "PRO", 0.3, "aupro", "AUPRO"),
)


def write_report(
    folder: Path,
    summary: dict[str, Any],
    records: Sequence[Record],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    with_images: bool = True,
    with_reconstructions: bool = False,
    write: Callable[[Path, str], object] = atomic_write,
) -> Path:
    """Write ``folder/report.html`` for a test run (with ``write(path, text)``: atomically by default).

    ``summary`` is what ``metrics.json`` holds (run, data, model, metrics, threshold, ...),
    ``records`` the per-image records of the evaluation and ``curves`` its thinned curves. With
    ``with_images``, each image card shows the record's overlay thumbnail (``record.overlay``, as
    :meth:`.images.ReportImages.add` returned it) and opens the viewer on the files beside it
    (:func:`.images.viewer_files`), with ``with_reconstructions`` also the reconstruction.
    Images with the verdict ``error`` are listed first and counted in the header.
    """
    threshold = summary.get("threshold")
    judged = [r for r in records if r.verdict != "error"]
    errors = [r for r in records if r.verdict == "error"]
    labels = np.array([r.label for r in judged], dtype=int)
    scores = np.array([r.score for r in judged], dtype=np.float64)
    plots = [
        line_plot(title, xlabel, ylabel, curves[key], (0.0, x_max), summary["metrics"].get(metric), area)
        for key, title, xlabel, ylabel, x_max, metric, area in _CURVES
        if key in curves
    ]
    if scores.size:
        label = threshold_label(summary.get("calibration"), summary.get("verdicts"))
        plots.append(histogram(scores, labels, threshold, label))
    ordered = [*errors, *sorted(judged, key=lambda r: -r.score)]
    cards = [card(r, with_images, with_reconstructions) for r in ordered]
    shown = "the input, the reconstruction and the overlay" if with_reconstructions else "the input and the overlay"
    policy = f"script-src '{VIEWER_SCRIPT_HASH}'; object-src 'none'; base-uri 'none'; form-action 'none'"
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
        f"<title>defectscope report: {esc(summary.get('run', ''))}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>defectscope test report</h1>",
        '<div class="header"><div>',
        *(f'<p class="facts">{esc(f)}</p>' for f in _facts(summary, records, errors)),
        "</div>",
        model_table(summary.get("model")),
        "</div>",
        *verdicts_section(summary),
        '<div class="sections"><section>',
        '<h2 id="by-type">Defect types</h2>',
        defect_types_table(records, threshold),
        "</section><section>",
        "<h2>Metrics</h2>",
        metrics_table(summary["metrics"]),
        "</section></div>",
        "<h2>Curves and scores</h2>",
        '<div class="plots">',
        *plots,
        "</div>",
        "<h2>Images, highest score first</h2>",
        '<p class="facts">Each card shows the anomaly map over the input in the colours below, the ground truth '
        f"outlined in green; click a card (or press Enter on it) to see {shown} at full resolution. "
        "Red cards are wrong verdicts (false positive: good image judged anomalous; false negative: "
        "defective image judged good); the bar is the score against the threshold (the black mark).</p>",
        colour_bar(threshold, RAMP.tolist()),
        '<div class="grid">',
        *cards,
        "</div>",
        *([VIEWER, f"<script>{VIEWER_SCRIPT}</script>"] if with_images else []),
        "</body></html>",
    ]
    path = Path(folder) / REPORT_FILE
    write(path, "\n".join(page) + "\n")
    return path


def _facts(summary: dict[str, Any], records: Sequence[Record], errors: Sequence[Record]) -> list[str]:
    """The header's lines: what was tested on what, the threshold, speed, wrong verdicts and notes."""
    threshold = summary.get("threshold")
    facts = [
        f"run: {summary.get('run', '')}",
        f"data: {summary.get('data', '')}",
        f"{len(records)} images: {sum(r.label == 0 for r in records)} good, "
        f"{sum(r.label == 1 for r in records)} defective",
        f"threshold: {fmt(threshold) if threshold is not None else 'none (model not calibrated)'}",
        f"{summary.get('images_per_second', float('nan'))} images/s",
    ]
    if threshold is not None:
        n_fp = sum(flag(r) == "fp" for r in records)
        n_fn = sum(flag(r) == "fn" for r in records)
        facts.append(f"{n_fp} false positives, {n_fn} false negatives at the threshold")
    if errors:
        facts.append(
            f"{len(errors)} image(s) could not be judged (verdict error): "
            + "; ".join(f"{Path(r.path).name}: {r.reason}" for r in errors[:5])
        )
    return facts + [f"note: {note}" for note in summary.get("notes", [])]
