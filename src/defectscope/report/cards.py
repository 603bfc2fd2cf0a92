"""The report's image cards and the viewer they open: the input, the overlay at full resolution and
(for reconstruction methods) the reconstruction, one at a time, with the keys to step through them.

The viewer is the page's one inline script (plain JavaScript); :data:`VIEWER_SCRIPT_HASH` allows
exactly it in the page's Content-Security-Policy.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from ..records import Record
from .images import viewer_files
from .text import esc

#: Top of the score bar, in multiples of the threshold (the colour bar's scale too).
BAR_TOP = 1.5


def flag(record: Record) -> str | None:
    """'fp' / 'fn' where the verdict contradicts the label, 'error' where there is none to trust."""
    if record.verdict == "error":
        return "error"
    verdict = record.anomalous
    if verdict is None or verdict == bool(record.label):
        return None
    return "fp" if verdict else "fn"


def _relative(record: Record) -> str:
    """The score against the threshold in words and as a bar with the threshold marked."""
    ratio = record.normalized_score
    if ratio is None:
        return ""
    filled = min(max(ratio / BAR_TOP, 0.0), 1.0) * 100
    over = " over" if ratio > 1 else ""
    return (
        f'<div class="relative">{ratio:.2f} &times; threshold</div>'
        f'<div class="meter" title="score / threshold, 0 to {BAR_TOP:g}">'
        f'<span class="fill{over}" style="width:{filled:.1f}%"></span>'
        f'<span class="mark" style="left:{100 / BAR_TOP:.1f}%"></span></div>'
    )


def card(record: Record, with_images: bool, with_reconstructions: bool = False) -> str:
    """One image's card: the thumbnail overlay (click for the viewer), name, score and verdict."""
    kind = flag(record)
    verdict = "not calibrated" if record.verdict is None else record.verdict
    flag_text = {"fp": "false positive", "fn": "false negative", "error": record.reason or "error"}.get(kind or "", "")
    name = f"{record.defect_type}/{Path(record.path).name}" if record.defect_type else Path(record.path).name
    attrs = f' data-score="{record.score:.6g}" data-label="{record.label}"'
    image = ""
    if with_images and record.overlay:
        files = viewer_files(record.overlay)
        relative = f" ({record.normalized_score:.2f} \u00d7 threshold)" if record.normalized_score is not None else ""
        title = f"{name}: score {record.score:.4g}{relative}, {verdict}" + (f" ({flag_text})" if flag_text else "")
        attrs += (
            f' tabindex="0" data-title="{esc(title)}" data-overlay="{esc(files["full"])}"'
            f' data-input="{esc(files["inputs"])}"'
            + (f' data-reconstruction="{esc(files["reconstructions"])}"' if with_reconstructions else "")
        )
        image = (
            f'<div class="thumb"><img src="{esc(record.overlay)}" alt="anomaly map of {esc(name)}" '
            'loading="lazy"></div>'
        )
    return (
        f'<div class="card {kind or "ok"}"{attrs}>{image}<div class="name">{esc(name)}</div>'
        f"<div>score {record.score:.4g} &middot; {esc(verdict)}"
        + (f' &middot; <span class="flag">{esc(flag_text)}</span>' if flag_text else "")
        + f"</div>{_relative(record)}</div>"
    )


VIEWER = """<div id="viewer" class="viewer" hidden role="dialog" aria-modal="true" aria-label="image viewer">
<div class="viewer-bar"><span id="viewer-title"></span>
<button type="button" data-show="overlay">overlay</button><button type="button" data-show="input">input</button>
<button type="button" data-show="reconstruction">reconstruction</button>
<button type="button" id="viewer-actual" title="show the image's pixels 1:1">1:1</button>
<span class="keys">T toggle &middot; &larr; &rarr; previous / next &middot; Esc close</span>
<button type="button" id="viewer-close">close</button></div>
<div class="viewer-stage" id="viewer-stage"><img id="viewer-image" alt=""></div></div>"""

VIEWER_SCRIPT = """(() => {
  const cards = Array.from(document.querySelectorAll(".card[data-overlay]"));
  const viewer = document.getElementById("viewer");
  const image = document.getElementById("viewer-image");
  const stage = document.getElementById("viewer-stage");
  const buttons = Array.from(viewer.querySelectorAll("button[data-show]"));
  let at = -1;
  let show = "overlay";
  function render() {
    const c = cards[at].dataset;
    if (show === "reconstruction" && !c.reconstruction) show = "overlay";
    image.src = c[show];
    image.alt = show + " of " + c.title;
    document.getElementById("viewer-title").textContent = (at + 1) + " / " + cards.length + "  " + c.title;
    for (const b of buttons) {
      b.hidden = b.dataset.show === "reconstruction" && !c.reconstruction;
      b.setAttribute("aria-pressed", String(b.dataset.show === show));
    }
  }
  function open(i) {
    at = Math.max(0, Math.min(cards.length - 1, i));
    viewer.hidden = false;
    document.body.classList.add("viewing");
    render();
  }
  function close() {
    viewer.hidden = true;
    document.body.classList.remove("viewing");
    if (at >= 0) cards[at].focus();
    at = -1;
  }
  cards.forEach((card, i) => {
    card.addEventListener("click", () => open(i));
    card.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(i); }
    });
  });
  for (const b of buttons) b.addEventListener("click", () => { show = b.dataset.show; render(); });
  document.getElementById("viewer-close").addEventListener("click", close);
  document.getElementById("viewer-actual").addEventListener("click", () => stage.classList.toggle("actual"));
  stage.addEventListener("click", (e) => { if (e.target === stage) close(); });
  document.addEventListener("keydown", (e) => {
    if (viewer.hidden) return;
    if (e.key === "Escape") close();
    else if (e.key === "ArrowRight") open(at + 1);
    else if (e.key === "ArrowLeft") open(at - 1);
    else if (e.key === "t" || e.key === "T") { show = show === "input" ? "overlay" : "input"; render(); }
    else return;
    e.preventDefault();
  });
})();"""

#: The script's hash for the Content-Security-Policy's script-src.
VIEWER_SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(VIEWER_SCRIPT.encode()).digest()).decode()
