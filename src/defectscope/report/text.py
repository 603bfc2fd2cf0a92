"""Text helpers of the HTML report: escaping and number formatting for people."""

from __future__ import annotations

import html
import math


def esc(value: object) -> str:
    """``value`` as text, escaped for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def fmt(value: float | None) -> str:
    """A number with four decimals, "n/a" for none or a non-finite one."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def pct(value: float | None) -> str:
    """A rate as a percentage for people: "4.8 %", "0 %", "0.02 %" (never "0 %" for a non-zero rate)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{100 * value:.1f}".removesuffix(".0")
    if text == "0" and value > 0:
        text = f"{100 * value:.2g}"
    return f"{text} %"
