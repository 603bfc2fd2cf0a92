"""The report page's model header, per-defect-type table, colour bar and cards, on reports written from
records made with ``Record.of`` and their ``verdict_summary``, as ``metrics.json`` holds them."""

import base64
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sklearn.metrics import roc_auc_score

from defectscope.metrics.verdicts import verdict_summary
from defectscope.records import Record
from defectscope.report.html import write_report
from helpers import labelled_records

THRESHOLD = 2.0
MODEL = {
    "method": "padim",
    "backbone": "wide_resnet50_2",
    "image_size": 256,
    "geometry": "tiles of 256 px (overlap 32 px) at scale 0.5",
    "n_fit_images": 209,
    "fitted_at": "2025-03-01T15:05:00+01:00",
    "defectscope_version": "0.5.0",
    "categories": ["bottle"],
}


def _records(threshold: float | None) -> list[Record]:
    """10 good images (2 above the threshold, one NaN score) and two defect types."""
    good = [0.5, 0.8, 1.0, 1.2, 1.4, 1.5, 1.7, 2.4, 3.0, float("nan")]
    defects = {"crack": [1.1, 2.5, 3.5, 6.0], "scratch": [1.6, 1.9, 2.2]}
    records = labelled_records(good, defects, threshold)
    for record in records:
        record.overlay = f"overlays/{record.defect_type}_{Path(record.path).stem}.jpg"
    return records


def _page(folder: Path, threshold: float | None = THRESHOLD, **summary: Any) -> str:
    records = _records(threshold)
    content = {"run": "runs/c", "data": "data/c", "threshold": threshold, "metrics": {}, "notes": []}
    content["verdicts"] = verdict_summary(records)
    content.update(summary)
    return write_report(folder, json.loads(json.dumps(content)), records, {}).read_text()


def _rows(page: str, table: str) -> dict[str, list[str]]:
    """Rows of a table by their first cell: the texts of the other cells."""
    body = re.search(rf'<table[^>]*id="{table}">(.*?)</table>', page, re.S)
    assert body is not None
    rows = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1)):
        cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_model_is_described_at_the_top(tmp_path: Path) -> None:
    page = _page(tmp_path, model=MODEL)
    rows = _rows(page, "model")
    assert rows == {
        "method": ["padim"],
        "backbone": ["wide_resnet50_2"],
        "image size": ["256 px"],
        "geometry": ["tiles of 256 px (overlap 32 px) at scale 0.5"],
        "fitted on": ["209 good images"],
        "fitted": ["2025-03-01 14:05 UTC"],
        "categories": ["bottle"],
        "defectscope": ["0.5.0"],
    }
    assert page.index('<p class="facts">') < page.index('id="model"') < page.index("Verdicts at the threshold")
    partial = {"method": "spade", "backbone": None, "image_size": 128}
    assert _rows(_page(tmp_path, model=partial), "model") == {"method": ["spade"], "image size": ["128 px"]}
    assert 'id="model"' not in _page(tmp_path)  # an older metrics.json without the model


def test_each_defect_type_against_all_good_images(tmp_path: Path) -> None:
    records = _records(THRESHOLD)
    rows = _rows(_page(tmp_path), "defect-types")
    assert list(rows) == ["defect type", "crack", "scratch", "good"]
    good = [r for r in records if r.label == 0 and r.score == r.score]  # the NaN score has no rank
    for kind, caught in (("crack", 3), ("scratch", 1)):
        of_type = [r for r in records if r.defect_type == kind]
        expected = roc_auc_score([r.label for r in good + of_type], [r.score for r in good + of_type])
        n, area, at_threshold = rows[kind]
        assert int(n) == len(of_type) and float(area) == pytest.approx(expected, abs=5e-5)
        assert at_threshold.endswith(f"({caught} / {len(of_type)})") and at_threshold.startswith("recall")
    assert rows["good"] == ["10", "", "false alarms 30 % (3 / 10)"]  # the NaN score counts as flagged
    untested = _rows(_page(tmp_path, threshold=None), "defect-types")
    assert untested["crack"][2] == "n/a" and untested["good"][2] == "n/a"


@pytest.mark.parametrize("threshold", [THRESHOLD, None])
def test_colour_bar_and_the_score_against_the_threshold(tmp_path: Path, threshold: float | None) -> None:
    page = _page(tmp_path, threshold=threshold)
    bar = re.search(r'<svg[^>]*data-plot="colour-bar".*?</svg>', page, re.S)
    assert bar is not None
    ticks = [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", bar.group(0))[1:]]
    assert ticks == (["0", "threshold 2", "3"] if threshold else ["0", "the image's own maximum"])
    crack = re.search(r'<div class="card[^"]*"[^>]*data-score="6"[^>]*>(.*?)</div></div>', page, re.S)
    assert crack is not None
    if threshold:
        assert "3.00 &times; threshold" in crack.group(1) and 'class="fill over" style="width:100.0%"' in crack.group(1)
        assert re.search(r'data-score="1.6".*?class="fill" style="width:53.3%"', page, re.S)
    else:
        assert "threshold" not in crack.group(1) and 'class="meter"' not in page


def test_the_one_script_is_allowed_by_its_hash(tmp_path: Path) -> None:
    page = _page(tmp_path)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1 and "<script src" not in page
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert policy is not None and f"script-src 'sha256-{digest}'" in policy.group(1)
    hostile = '<img src=x onerror="alert(1)">'
    assert hostile not in _page(tmp_path, run=hostile, model={"method": hostile})
