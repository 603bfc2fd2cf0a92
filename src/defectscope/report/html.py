"""The HTML test report: one self-contained page with metrics, curves, a score histogram and every image.

Plots are inline SVG drawn here (no plotting dependency); images are linked from the sibling
``overlays/`` folder that ``defectscope test`` writes, so the page and that folder travel together.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import atomic_write
from ..records import Record

REPORT_FILE = "report.html"
_GOOD, _BAD, _LINE, _THRESHOLD = "#2a7ab0", "#d0452f", "#222222", "#e08a00"

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
        f"threshold: {_fmt(threshold) if threshold is not None else 'none (model not calibrated)'}",
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
        _line_plot(title, xlabel, ylabel, curves[key], (0.0, x_max), summary["metrics"].get(metric), area)
        for key, title, xlabel, ylabel, x_max, metric, area in _CURVES
        if key in curves
    ]
    if scores.size:
        plots.append(_histogram(scores, labels, threshold))
    cards = [_card(r, with_images, with_reconstructions) for r in [*errors, *sorted(judged, key=lambda r: -r.score)]]
    layout = (
        "Left: input. Middle: the model's reconstruction (what the part should look like). Right: anomaly map"
        if with_reconstructions
        else "Left: input. Right: anomaly map"
    )
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>defectscope report: {_esc(summary.get('run', ''))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>defectscope test report</h1>",
        *(f'<p class="facts">{_esc(f)}</p>' for f in facts),
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


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _flag(record: Record) -> str | None:
    """'fp' / 'fn' where the verdict contradicts the label, 'error' where there is none to trust."""
    if record.verdict == "error":
        return "error"
    verdict = record.anomalous
    if verdict is None or verdict == bool(record.label):
        return None
    return "fp" if verdict else "fn"


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = "".join(f'<tr><td>{_esc(k)}</td><td class="value">{_fmt(v)}</td></tr>' for k, v in metrics.items())
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
            f'<img src="overlays/inputs/{_esc(stem)}.jpg" alt="input {_esc(name)}" loading="lazy">'
            + (
                f'<img src="overlays/reconstructions/{_esc(stem)}.jpg" alt="reconstruction {_esc(name)}" '
                'loading="lazy">'
                if with_reconstructions
                else ""
            )
            + f'<img src="{_esc(record.overlay)}" alt="anomaly map {_esc(name)}" loading="lazy">'
        )
    wide = " wide" if with_images and with_reconstructions else ""
    return (
        f'<div class="card {flag or "ok"}{wide}" data-score="{record.score:.6g}" data-label="{record.label}">'
        f'{images}<div class="name">{_esc(name)}</div>'
        f"<div>score {record.score:.4g} &middot; verdict {_esc(verdict_text)}"
        + (f' &middot; <span class="flag">{_esc(flag_text)}</span>' if flag_text else "")
        + "</div></div>"
    )


# -- SVG plots ---------------------------------------------------------------------------------
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 360, 300, 52, 14, 30, 44


def _ticks(low: float, high: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [low, high]."""
    span = high - low if high > low else 1.0
    raw = span / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


class _Frame:
    """Axes of one plot: maps data coordinates to SVG pixels and draws the frame, grid and labels."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range

    def px(self, x: float) -> float:
        return _LEFT + (x - self.x0) / (self.x1 - self.x0) * (_W - _LEFT - _RIGHT)

    def py(self, y: float) -> float:
        return _H - _BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (_H - _TOP - _BOTTOM)

    def axes(self, title: str, xlabel: str, ylabel: str) -> list[str]:
        parts = [
            f'<text x="{_W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{_esc(title)}</text>'
        ]
        for t in _ticks(self.x0, self.x1):
            x = self.px(t)
            parts.append(
                f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_H - _BOTTOM}" stroke="#eee"/>'
                f'<text x="{x:.1f}" y="{_H - _BOTTOM + 14}" text-anchor="middle" font-size="10">'
                f"{t:.3g}</text>"
            )
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            parts.append(
                f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
                f'<text x="{_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end" font-size="10">{t:.3g}</text>'
            )
        parts.append(
            f'<rect x="{_LEFT}" y="{_TOP}" width="{_W - _LEFT - _RIGHT}" height="{_H - _TOP - _BOTTOM}" '
            'fill="none" stroke="#888"/>'
        )
        parts.append(
            f'<text x="{(_LEFT + _W - _RIGHT) / 2}" y="{_H - 8}" text-anchor="middle" font-size="12">'
            f"{_esc(xlabel)}</text>"
        )
        parts.append(
            f'<text transform="translate(14 {(_TOP + _H - _BOTTOM) / 2}) rotate(-90)" text-anchor="middle" '
            f'font-size="12">{_esc(ylabel)}</text>'
        )
        return parts


def _svg(kind: str, parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" data-plot="{kind}" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" font-family="sans-serif">' + "".join(parts) + "</svg>"
    )


def _line_plot(
    title: str,
    xlabel: str,
    ylabel: str,
    curve: tuple[np.ndarray, np.ndarray],
    x_range: tuple[float, float],
    area: float | None,
    area_name: str,
) -> str:
    frame = _Frame(x_range, (0.0, 1.0))
    x, y = curve
    points = " ".join(f"{frame.px(a):.1f},{frame.py(b):.1f}" for a, b in zip(x, y))
    parts = frame.axes(title, xlabel, ylabel)
    parts.append(f'<polyline points="{points}" fill="none" stroke="{_LINE}" stroke-width="2"/>')
    if area is not None:
        parts.append(
            f'<text x="{_W - _RIGHT - 6}" y="{_H - _BOTTOM - 8}" text-anchor="end" font-size="12">'
            f"{area_name} {_fmt(area)}</text>"
        )
    return _svg(area_name.lower(), parts)


def _histogram(scores: np.ndarray, labels: np.ndarray, threshold: float | None, n_bins: int = 24) -> str:
    """Overlaid score histograms of good and defective images, with the threshold as a dashed line."""
    values = np.append(scores, threshold) if threshold is not None else scores
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, n_bins + 1)
    good = np.histogram(scores[labels == 0], edges)[0]
    bad = np.histogram(scores[labels == 1], edges)[0]
    frame = _Frame((low, high), (0.0, float(max(5, good.max(initial=0), bad.max(initial=0)))))
    parts = frame.axes("Image scores", "anomaly score", "images")
    base = frame.py(0.0)
    for counts, colour in ((good, _GOOD), (bad, _BAD)):
        for left, right, count in zip(edges[:-1], edges[1:], counts):
            if count:
                top, x0 = frame.py(float(count)), frame.px(left)
                parts.append(
                    f'<rect x="{x0:.1f}" y="{top:.1f}" width="{frame.px(right) - x0:.1f}" '
                    f'height="{base - top:.1f}" fill="{colour}" fill-opacity="0.55"/>'
                )
    if threshold is not None:
        x = frame.px(threshold)
        left_of_line = x > _W / 2
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{base:.1f}" stroke="{_THRESHOLD}" '
            'stroke-width="2" stroke-dasharray="5,3"/>'
            f'<text x="{x - 4 if left_of_line else x + 4:.1f}" y="{_TOP + 12}" font-size="11" '
            f'text-anchor="{"end" if left_of_line else "start"}" fill="{_THRESHOLD}">threshold</text>'
        )
    legend_y = _H - 17
    parts.append(
        f'<rect x="8" y="{legend_y}" width="10" height="10" fill="{_GOOD}" fill-opacity="0.55"/>'
        f'<text x="21" y="{legend_y + 9}" font-size="11">good</text>'
        f'<rect x="54" y="{legend_y}" width="10" height="10" fill="{_BAD}" fill-opacity="0.55"/>'
        f'<text x="67" y="{legend_y + 9}" font-size="11">defective</text>'
    )
    return _svg("histogram", parts)
