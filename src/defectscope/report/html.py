"""The HTML test report: one self-contained page with the verdicts at the threshold, metrics, curves,
a score histogram and every image.

The verdicts section comes from :mod:`.verdicts` and the plots, inline SVG, from :mod:`.plots` (no
plotting dependency); images are linked from the sibling ``overlays/`` folder that ``defectscope test``
writes, so the page and that folder travel together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import atomic_write
from ..records import Record
from .plots import histogram, line_plot
from .text import esc, fmt
from .verdicts import threshold_label, verdicts_section

REPORT_FILE = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 6px; } h2 { font-size: 17px; margin: 26px 0 8px; }
.facts { color: #555; margin: 2px 0; }
table.metrics { border-collapse: collapse; } table.metrics td, table.metrics th { padding: 3px 12px;
  border-bottom: 1px solid #ddd; text-align: left; } table.metrics td.value { text-align: right;
  font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plots svg { border: 1px solid #ddd; background: #fff; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 3px solid #ddd; padding: 4px; width: 264px; font-size: 12px; }
.card img { width: 128px; height: 128px; object-fit: contain; background: #eee; }
.card.wide { width: 396px; }
.card.fp, .card.fn, .card.error { border-color: #d0452f; background: #fdf0ed; }
.flag { color: #d0452f; font-weight: bold; }
.name { overflow-wrap: anywhere; }
.rule { margin: 2px 0 4px; max-width: 960px; }
.note { border-left: 4px solid #e08a00; background: #fff6e6; padding: 4px 10px; margin: 6px 0; max-width: 940px; }
.tables { display: flex; flex-wrap: wrap; gap: 10px 36px; align-items: flex-start; margin-top: 8px; }
table.metrics caption { text-align: left; font-weight: bold; padding: 0 0 4px 12px; }
table.metrics th.row { font-weight: normal; } table.metrics td.sub { padding-left: 30px; }
table.metrics tr.over td, table.metrics td.wrong { color: #d0452f; font-weight: bold; }
.small { color: #555; font-size: 13px; }
"""


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

    ``summary`` is what ``metrics.json`` holds (run, data, metrics, threshold, ...), ``records``
    the per-image records of the evaluation and ``curves`` its thinned curves. With
    ``with_images``, each image card shows the record's overlay ``overlays/<name>.png`` and the
    input ``overlays/inputs/<name>.jpg``, and with ``with_reconstructions`` also
    ``overlays/reconstructions/<name>.jpg`` (between the two). Images with the verdict ``error``
    are listed first and counted in the header.
    """
    threshold = summary.get("threshold")
    judged = [r for r in records if r.verdict != "error"]
    errors = [r for r in records if r.verdict == "error"]
    labels = np.array([r.label for r in judged], dtype=int)
    scores = np.array([r.score for r in judged], dtype=np.float64)
    n_fp = sum(_flag(r) == "fp" for r in records)
    n_fn = sum(_flag(r) == "fn" for r in records)
    facts = [
        f"run: {summary.get('run', '')}",
        f"data: {summary.get('data', '')}",
        f"{len(records)} images: {sum(r.label == 0 for r in records)} good, "
        f"{sum(r.label == 1 for r in records)} defective",
        f"threshold: {fmt(threshold) if threshold is not None else 'none (model not calibrated)'}",
        f"{summary.get('images_per_second', float('nan'))} images/s",
    ]
    if threshold is not None:
        facts.append(f"{n_fp} false positives, {n_fn} false negatives at the threshold")
    if errors:
        facts.append(
            f"{len(errors)} image(s) could not be judged (verdict error): "
            + "; ".join(f"{Path(r.path).name}: {r.reason}" for r in errors[:5])
        )
    facts += [f"note: {note}" for note in summary.get("notes", [])]
    plots = [
        line_plot(title, xlabel, ylabel, curves[key], (0.0, x_max), summary["metrics"].get(metric), area)
        for key, title, xlabel, ylabel, x_max, metric, area in _CURVES
        if key in curves
    ]
    if scores.size:
        label = threshold_label(summary.get("calibration"), summary.get("verdicts"))
        plots.append(histogram(scores, labels, threshold, label))
    cards = [_card(r, with_images, with_reconstructions) for r in [*errors, *sorted(judged, key=lambda r: -r.score)]]
    layout = (
        "Left: input. Middle: the model's reconstruction (what the part should look like). Right: anomaly map"
        if with_reconstructions
        else "Left: input. Right: anomaly map"
    )
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>defectscope report: {esc(summary.get('run', ''))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>defectscope test report</h1>",
        *(f'<p class="facts">{esc(f)}</p>' for f in facts),
        *verdicts_section(summary),
        "<h2>Metrics</h2>",
        _metrics_table(summary["metrics"]),
        "<h2>Curves and scores</h2>",
        '<div class="plots">',
        *plots,
        "</div>",
        "<h2>Images, highest score first</h2>",
        f'<p class="facts">{layout} over the input, ground truth outlined in green. '
        "Red cards are wrong verdicts (false positive: good image judged anomalous; false negative: "
        "defective image judged good).</p>",
        '<div class="grid">',
        *cards,
        "</div>",
        "</body></html>",
    ]
    path = Path(folder) / REPORT_FILE
    write(path, "\n".join(page) + "\n")
    return path


def _flag(record: Record) -> str | None:
    """'fp' / 'fn' where the verdict contradicts the label, 'error' where there is none to trust."""
    if record.verdict == "error":
        return "error"
    verdict = record.anomalous
    if verdict is None or verdict == bool(record.label):
        return None
    return "fp" if verdict else "fn"


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = "".join(f'<tr><td>{esc(k)}</td><td class="value">{fmt(v)}</td></tr>' for k, v in metrics.items())
    return f'<table class="metrics" id="metrics"><tr><th>metric</th><th>value</th></tr>{rows}</table>'


def _card(record: Record, with_images: bool, with_reconstructions: bool = False) -> str:
    flag = _flag(record)
    verdict_text = "not calibrated" if record.verdict is None else record.verdict
    flag_text = {"fp": "false positive", "fn": "false negative", "error": record.reason or "error"}.get(flag or "", "")
    name = f"{record.defect_type}/{Path(record.path).name}"
    images = ""
    if with_images and record.overlay:
        stem = Path(record.overlay).stem
        images = (
            f'<img src="overlays/inputs/{esc(stem)}.jpg" alt="input {esc(name)}" loading="lazy">'
            + (
                f'<img src="overlays/reconstructions/{esc(stem)}.jpg" alt="reconstruction {esc(name)}" loading="lazy">'
                if with_reconstructions
                else ""
            )
            + f'<img src="{esc(record.overlay)}" alt="anomaly map {esc(name)}" loading="lazy">'
        )
    wide = " wide" if with_images and with_reconstructions else ""
    return (
        f'<div class="card {flag or "ok"}{wide}" data-score="{record.score:.6g}" data-label="{record.label}">'
        f'{images}<div class="name">{esc(name)}</div>'
        f"<div>score {record.score:.4g} &middot; verdict {esc(verdict_text)}"
        + (f' &middot; <span class="flag">{esc(flag_text)}</span>' if flag_text else "")
        + "</div></div>"
    )
