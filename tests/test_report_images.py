"""ReportImages: the files a test report links (thumbnail, full-resolution overlay and input,
reconstruction), written in background threads and put in place together; and the report's viewer
in a real browser (Playwright driving Debian's chromium)."""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from defectscope.errors import OutputError
from defectscope.metrics.verdicts import verdict_summary
from defectscope.records import Record
from defectscope.report.html import write_report
from defectscope.report.images import THUMBNAIL, ReportImages, viewer_files

CHROMIUM = Path("/usr/bin/chromium")
THRESHOLD = 1.0


@dataclass
class Item:
    """A scored image as the geometry gives it (the attributes ReportImages reads)."""

    path: str
    score: float
    map: np.ndarray
    size: tuple[int, int]
    image: np.ndarray
    mask: np.ndarray | None = None
    reconstruction: np.ndarray | None = None


def _item(path: str, size: tuple[int, int] = (180, 300), score: float = 0.5, defect: bool = False, **kw: Any) -> Item:
    """A grey (H, W) image with a 64 x 64 map (squeezed, as the square geometry gives it) that is
    ``score`` x the threshold in its top-left quarter; a defect has its mask there."""
    height, width = size
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    ramp = np.linspace(60, 200, width, dtype=np.float32)[None, :, None]
    image = (ramp + rng.normal(0, 2, (height, width, 3))).clip(0, 255).astype(np.uint8)
    amap = np.zeros((64, 64), np.float32)
    amap[:32, :32] = score * THRESHOLD
    mask = None
    if defect:
        mask = np.zeros((height, width), bool)
        mask[: height // 2, : width // 2] = True
    return Item(path, score * THRESHOLD, amap, size, image, mask, **kw)


def _written(folder: Path, items: list[Item], threads: int = 2) -> tuple[ReportImages, list[str]]:
    images = ReportImages(folder, [i.path for i in items], THRESHOLD, threads=threads)
    overlays = [images.add(i) for i in items]
    images.commit()
    return images, overlays


def test_layout_sizes_and_colours(tmp_path: Path) -> None:
    items = [_item("good/000.png"), _item("bad/000.png", (1200, 500), score=2.0, defect=True)]
    images, overlays = _written(tmp_path, items)
    assert overlays == ["overlays/good_000.jpg", "overlays/bad_000.jpg"]
    assert not images.with_reconstructions and not (tmp_path / "overlays" / "reconstructions").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["overlays"]  # no hidden folder left
    for item, overlay in zip(items, overlays):
        height, width = item.size
        files = viewer_files(overlay)
        thumb = Image.open(tmp_path / overlay)
        factor = -(-max(width, height) // THUMBNAIL)  # reduced by a whole factor, long side <= THUMBNAIL
        assert max(thumb.size) == -(-max(width, height) // factor) <= THUMBNAIL
        assert thumb.size[0] / thumb.size[1] == pytest.approx(width / height, rel=0.02)  # the true aspect ratio
        for key in ("full", "inputs"):
            assert Image.open(tmp_path / files[key]).size == (width, height)  # native resolution
    # The 2 x threshold quarter is red (top of the scale), the rest dark blue; the mask's edge is green.
    full = np.asarray(Image.open(tmp_path / viewer_files(overlays[1])["full"]).convert("RGB")).astype(int)
    hot, cold = full[200, 100], full[900, 400]
    assert hot[0] > hot[2] + 40 and cold[2] > cold[0] + 40
    edge = full[600 - 2, 100]  # just inside the mask's lower edge (rows 0..599)
    assert edge[1] > 200 and edge[0] < 80 and edge[2] < 80
    inputs = np.asarray(Image.open(tmp_path / viewer_files(overlays[1])["inputs"])).astype(int)
    assert np.abs(inputs - items[1].image).mean() < 3  # the input as it was, barely touched by JPEG


def test_reconstructions_duplicates_and_threads(tmp_path: Path) -> None:
    recon = np.zeros((64, 64, 3), np.uint8)
    items = [_item("a/x.png", reconstruction=recon), _item("a/x.png", score=1.4), _item("b/x.png")]
    images, overlays = _written(tmp_path / "threads", items)
    assert images.with_reconstructions
    assert overlays == ["overlays/a_x.jpg", "overlays/a_x_2.jpg", "overlays/b_x.jpg"]
    assert [p.name for p in (tmp_path / "threads" / "overlays" / "reconstructions").iterdir()] == ["a_x.jpg"]
    _, again = _written(tmp_path / "calling", items, threads=0)  # the same files written in the calling thread
    assert again == overlays
    for path in (tmp_path / "threads" / "overlays").rglob("*.jpg"):
        assert path.read_bytes() == (tmp_path / "calling" / path.relative_to(tmp_path / "threads")).read_bytes()
    with pytest.raises(ValueError, match="not among the paths"):
        ReportImages(tmp_path / "x", ["a.png"], None).add(_item("b.png"))


def test_a_failed_write_keeps_the_earlier_overlays(tmp_path: Path) -> None:
    _written(tmp_path, [_item("old/a.png")])
    images = ReportImages(tmp_path, ["new/b.png", "new/c.png"], THRESHOLD)
    shutil.rmtree(images.root / "full")  # every full-resolution write now fails
    images.add(_item("new/b.png"))
    with pytest.raises(OutputError, match="cannot write"):
        images.add(_item("new/c.png"))  # the first error is raised as soon as it is known ...
        images.commit()  # ... or at the latest here
    with pytest.raises(OutputError):
        images.commit()
    images.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlays"]
    assert [p.name for p in (tmp_path / "overlays").glob("*.jpg")] == ["a.jpg"]


def test_discard_removes_the_new_images(tmp_path: Path) -> None:
    images = ReportImages(tmp_path, ["a.png"], None)
    images.add(_item("a.png"))
    images.discard()
    images.discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        images.add(_item("a.png"))


def _report(folder: Path) -> Path:
    """A report of four images (one a false negative, one with a reconstruction) with its images."""
    specs = [("good/000.png", 0, 0.4), ("good/001.png", 0, 0.7), ("crack/000.png", 1, 2.1), ("crack/001.png", 1, 0.9)]
    items = [
        _item(path, (240 + 60 * i, 400), score, defect=bool(label), reconstruction=np.zeros((64, 64, 3), np.uint8))
        for i, (path, label, score) in enumerate(specs)
    ]
    images = ReportImages(folder, [i.path for i in items], THRESHOLD)
    records = []
    for item, (path, label, _) in zip(items, specs):
        record = Record.of(path, "c", item.score, item.score, THRESHOLD, label=label, defect_type=path.split("/")[0])
        record.overlay = images.add(item)
        records.append(record)
    images.commit()
    summary = {"run": "runs/c", "data": "data/c", "threshold": THRESHOLD, "metrics": {}, "notes": []}
    summary["verdicts"] = json.loads(json.dumps(verdict_summary(records)))
    return write_report(folder, summary, records, {}, with_reconstructions=images.with_reconstructions)


def test_every_file_a_card_links_exists(tmp_path: Path) -> None:
    import re

    page = _report(tmp_path).read_text()
    links = re.findall(r'(?:src|data-overlay|data-input|data-reconstruction)="([^"]+)"', page)
    assert len(links) == 4 * 4 and all((tmp_path / link).is_file() for link in links)
    assert page.count("<script>") == 1 and "<script src" not in page


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
def test_clicking_a_card_opens_the_viewer(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    report = _report(tmp_path)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(report.as_uri())
            viewer, image = page.locator("#viewer"), page.locator("#viewer-image")
            assert viewer.is_hidden()
            cards = page.locator(".card[data-overlay]")
            assert cards.count() == 4
            second = cards.nth(1)
            second.click()
            assert viewer.is_visible()
            page.wait_for_function("() => document.getElementById('viewer-image').naturalWidth > 0")
            natural = page.evaluate(
                "() => [document.getElementById('viewer-image').naturalWidth, "
                "document.getElementById('viewer-image').naturalHeight]"
            )
            assert natural == [400, 420]  # the second highest score, crack/001 (420 x 400), at full resolution
            assert image.get_attribute("src") == second.get_attribute("data-overlay")
            assert second.get_attribute("data-title") in page.locator("#viewer-title").inner_text()
            page.keyboard.press("t")  # the toggle: the input, then the overlay again
            assert image.get_attribute("src") == second.get_attribute("data-input")
            page.locator('button[data-show="reconstruction"]').click()
            assert image.get_attribute("src") == second.get_attribute("data-reconstruction")
            page.keyboard.press("t")
            page.keyboard.press("t")
            assert image.get_attribute("src") == second.get_attribute("data-overlay")
            page.keyboard.press("ArrowRight")
            assert image.get_attribute("src") == cards.nth(2).get_attribute("data-overlay")
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("ArrowLeft")
            assert image.get_attribute("src") == cards.nth(0).get_attribute("data-overlay")
            page.keyboard.press("Escape")
            assert viewer.is_hidden()
            cards.nth(3).focus()
            page.keyboard.press("Enter")
            assert viewer.is_visible()
            page.locator("#viewer-close").click()
            assert viewer.is_hidden()
            assert not errors, f"errors on the page: {errors}"
        finally:
            browser.close()
