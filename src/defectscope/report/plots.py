"""The report's inline SVG plots (no plotting dependency): curve line plots and the score histogram
with its labelled threshold line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .text import esc, fmt

_GOOD, _BAD, _LINE, _THRESHOLD = "#2a7ab0", "#d0452f", "#222222", "#e08a00"

#: Plot size and the margins around its plot area, in pixels.
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
            f'<text x="{_W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{esc(title)}</text>'
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
            f"{esc(xlabel)}</text>"
        )
        parts.append(
            f'<text transform="translate(14 {(_TOP + _H - _BOTTOM) / 2}) rotate(-90)" text-anchor="middle" '
            f'font-size="12">{esc(ylabel)}</text>'
        )
        return parts


def _svg(kind: str, parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" data-plot="{kind}" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" font-family="sans-serif">' + "".join(parts) + "</svg>"
    )


def line_plot(
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
            f"{area_name} {fmt(area)}</text>"
        )
    return _svg(area_name.lower(), parts)


def histogram(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float | None,
    label: Sequence[str] = ("threshold",),
    n_bins: int = 24,
) -> str:
    """Overlaid score histograms of good and defective images, with the threshold as a dashed line
    labelled with ``label`` (lines of text, kept inside the plot area)."""
    values = np.append(scores, threshold) if threshold is not None else scores
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, n_bins + 1)
    good = np.histogram(scores[labels == 0], edges)[0]
    bad = np.histogram(scores[labels == 1], edges)[0]
    tallest = float(max(5, good.max(initial=0), bad.max(initial=0)))
    # Room above the bars for the threshold's label: the top part of the plot area it covers, and a margin.
    covered = (_label_height(len(label)) + 8) / (_H - _TOP - _BOTTOM) if threshold is not None else 0.0
    frame = _Frame((low, high), (0.0, tallest / (1.0 - covered)))
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
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{base:.1f}" stroke="{_THRESHOLD}" '
            'stroke-width="2" stroke-dasharray="5,3"/>'
        )
        parts.append(_line_label(x, label))
    legend_y = _H - 17
    parts.append(
        f'<rect x="8" y="{legend_y}" width="10" height="10" fill="{_GOOD}" fill-opacity="0.55"/>'
        f'<text x="21" y="{legend_y + 9}" font-size="11">good</text>'
        f'<rect x="54" y="{legend_y}" width="10" height="10" fill="{_BAD}" fill-opacity="0.55"/>'
        f'<text x="67" y="{legend_y + 9}" font-size="11">defective</text>'
    )
    return _svg("histogram", parts)


def _label_height(n_lines: int, font_size: int = 11) -> int:
    """Height in pixels of the box of :func:`_line_label` (its top is 3 px below the plot area's)."""
    return n_lines * (font_size + 3) + 5


def _line_label(x: float, lines: Sequence[str], font_size: int = 11) -> str:
    """Lines of text beside a vertical line at ``x``, on a pale box inside the plot area: on the side
    with more room, shifted inwards (over the line) where they do not fit there."""
    width = max(len(line) for line in lines) * font_size * 0.5 + 8  # sans-serif runs under 0.5 em a character
    height = _label_height(len(lines), font_size)
    inner_left, inner_right = _LEFT + 2, _W - _RIGHT - 2
    box = x - 4 - width if x - inner_left > inner_right - x else x + 4
    box = min(max(box, inner_left), inner_right - width)
    text = "".join(
        f'<tspan x="{box + 4:.1f}" y="{_TOP + 4 + (i + 1) * (font_size + 3) - 2:.1f}">{esc(line)}</tspan>'
        for i, line in enumerate(lines)
    )
    return (
        f'<g class="threshold-label"><rect x="{box:.1f}" y="{_TOP + 3}" width="{width:.1f}" height="{height}" '
        f'rx="3" fill="#ffffff" fill-opacity="0.88" stroke="{_THRESHOLD}" stroke-width="0.8"/>'
        f'<text font-size="{font_size}" fill="#8a4f00">{text}</text></g>'
    )


def colour_bar(threshold: float | None, ramp: Sequence[Sequence[float]], width: int = 420) -> str:
    """The heat map's colour scale: ``ramp`` (RGB stops) from 0 to 1.5 x the threshold, the threshold
    marked; without a threshold each image is coloured from 0 to its own maximum."""
    left, right, top, bar = 10, 10, 20, 14
    inner = width - left - right
    stops = "".join(
        f'<stop offset="{i / (len(ramp) - 1):.3f}" stop-color="rgb({int(r)},{int(g)},{int(b)})"/>'
        for i, (r, g, b) in enumerate(ramp)
    )
    parts = [
        f'<defs><linearGradient id="heat-ramp" x1="0" x2="1" y1="0" y2="0">{stops}</linearGradient></defs>',
        f'<text x="{left}" y="13" font-size="12">anomaly map colours</text>',
        f'<rect x="{left}" y="{top}" width="{inner}" height="{bar}" fill="url(#heat-ramp)" stroke="#888"/>',
    ]
    if threshold is not None and threshold > 0:
        ticks = [
            (0.0, "0", "start"),
            (2 / 3, f"threshold {threshold:.4g}", "middle"),
            (1.0, f"{1.5 * threshold:.4g}", "end"),
        ]
    else:
        ticks = [(0.0, "0", "start"), (1.0, "the image's own maximum", "end")]
    for at, text, anchor in ticks:
        x = left + at * inner
        weight = ' font-weight="bold"' if text.startswith("threshold") else ""
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 2}" x2="{x:.1f}" y2="{top + bar + 4}" stroke="#222" stroke-width="1.5"/>'
            f'<text x="{x:.1f}" y="{top + bar + 16}" text-anchor="{anchor}" font-size="11"{weight}>{esc(text)}</text>'
        )
    height = top + bar + 22
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="colour-bar" data-plot="colour-bar" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">' + "".join(parts) + "</svg>"
    )
