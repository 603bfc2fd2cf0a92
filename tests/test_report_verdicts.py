"""The report's "Verdicts at the threshold" section and threshold label, on reports written from real
summaries: records made with ``Record.of``, their ``verdict_summary`` and a real ``calibrate`` summary,
round-tripped through JSON as ``metrics.json`` holds them."""

import dataclasses
import json
import re
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defectscope.metrics.verdicts import verdict_summary
from defectscope.outputs import json_text
from defectscope.records import Record
from defectscope.report import plots as report
from defectscope.report.html import write_report
from defectscope.thresholds import Calibration, calibrate, rate_interval
from helpers import labelled_records

HELD_OUT = np.linspace(1.0, 2.0, 21)  # 21 held-out good scores: conformal 5 % takes the 20th (1.95)


class _Page(HTMLParser):
    """Tables by id (rows of cell texts and row attributes), note paragraphs and the threshold label."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[dict[str, str], list[str]]]] = {}
        self.cells: dict[str, str] = {}  # data-cell -> text
        self.notes: list[str] = []
        self.ids: set[str] = set()
        self.label: list[str] = []
        self.label_box: dict[str, str] = {}
        self._table: str | None = None
        self._cell: str | None = None
        self._text: list[str] | None = None
        self._note = False
        self._in_label = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append((a, []))
        elif tag in ("td", "th") and self._table is not None:
            self.tables[self._table][-1][1].append("")
            self._text = self.tables[self._table][-1][1]
            self._cell = a.get("data-cell")
            if self._cell:
                self.cells[self._cell] = ""
        elif tag == "p" and "note" in a.get("class", "").split():
            self._note = True
            self.notes.append("")
        elif tag == "g" and a.get("class") == "threshold-label":
            self._in_label = True
        elif tag == "rect" and self._in_label:
            self.label_box = a
        elif tag == "tspan" and self._in_label:
            self.label.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._text, self._cell = None, None
        elif tag == "p":
            self._note = False
        elif tag == "g":
            self._in_label = False

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text[-1] += data
            if self._cell:
                self.cells[self._cell] += data
        if self._note:
            self.notes[-1] += data
        if self._in_label and self.label:
            self.label[-1] += data


def _records(threshold: float | None) -> list[Record]:
    """20 good test images (one above 1.95, one with a NaN score) and 3 defect types, 3 of 12 at or
    below 1.95 (missed)."""
    good = [1.2, 1.5, 1.6, 1.7, 1.8, 1.9] * 3 + [2.5, float("nan")]
    defects = {"crack": [1.3, 3.0, 4.0, 5.0], "scratch": [1.4, 1.9, 2.6, 2.7, 2.8, 3.5], "hole": [6.0, 7.0]}
    records = labelled_records(good, defects, threshold)
    return records


def _write(folder: Path, records: list[Record], calibration: Calibration | None, **extra: Any) -> tuple[str, _Page]:
    summary = {
        "run": extra.pop("run", "runs/c"),
        "data": "data/c",
        "threshold": calibration.threshold if calibration else None,
        "calibration": calibration.summary() if calibration else None,
        "metrics": {"image_auroc": 0.9},
        "verdicts": verdict_summary(records),
        "notes": [],
        **extra,
    }
    summary = json.loads(json_text(summary))  # as metrics.json holds it: NaN as null, tuples as lists
    page = write_report(folder, summary, records, {}, with_images=False).read_text()
    parser = _Page()
    parser.feed(page)
    return page, parser


def _percent(text: str) -> float:
    return float(text.strip().removesuffix("%").strip()) / 100


def _rates(parser: _Page) -> dict[str, list[str]]:
    """Rows of the rate table: 'false_alarms', 'misses' and 'misses:<type>' -> cells after the first."""
    rows = {}
    for attrs, cells in parser.tables["rates"][1:]:
        key = attrs["data-rate"] + (f":{attrs['data-type']}" if "data-type" in attrs else "")
        rows[key] = cells[1:]
    return rows


def _check_rate(cells: list[str], count: int, n: int) -> None:
    assert cells[0] == f"{count} / {n}"
    assert _percent(cells[1]) == pytest.approx(count / n, abs=0.0005)
    low, high = (_percent(part) for part in cells[2].split("\u2013"))
    expected = rate_interval(count, n)
    assert low == pytest.approx(expected[0], abs=0.0005) and high == pytest.approx(expected[1], abs=0.0005)


def test_rates_and_confusion_counts_match_the_records(tmp_path: Path) -> None:
    calibration = calibrate(HELD_OUT, false_alarm_rate=0.05)
    records = _records(calibration.threshold)
    page, parser = _write(tmp_path, records, calibration)

    good = [r for r in records if r.label == 0]
    flagged_good = sum(r.verdict != "good" for r in good)  # the NaN score counts as flagged
    by_type: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.label == 1:
            by_type[r.defect_type or ""].append(r)
    missed = {kind: sum(r.verdict == "good" for r in rs) for kind, rs in by_type.items()}
    assert (flagged_good, sum(missed.values())) == (2, 3)

    rates = _rates(parser)
    assert set(rates) == {"false_alarms", "misses", "misses:crack", "misses:hole", "misses:scratch"}
    _check_rate(rates["false_alarms"], flagged_good, len(good))
    _check_rate(rates["misses"], sum(missed.values()), sum(map(len, by_type.values())))
    for kind, rs in by_type.items():
        _check_rate(rates[f"misses:{kind}"], missed[kind], len(rs))
    assert _percent(rates["false_alarms"][3].removeprefix("at most")) == pytest.approx(1 / 22, abs=0.0005)
    assert rates["misses"][3] == "none stated"  # the conformal rule bounds false alarms only

    n_defects = sum(map(len, by_type.values()))
    assert parser.cells == {
        "true_negative": str(len(good) - flagged_good),
        "false_positive": str(flagged_good),
        "false_negative": str(sum(missed.values())),
        "true_positive": str(n_defects - sum(missed.values())),
    }
    rows = [cells[0] for _, cells in parser.tables["confusion"]]
    assert rows[:3] == ["", "actually good", "actually defective"]
    assert parser.tables["confusion"][0][1][1:] == ["judged good", "judged anomalous"]
    accuracy = (len(records) - flagged_good - sum(missed.values())) / len(records)
    assert f"accuracy {100 * accuracy:.1f} %" in page

    # The rule in plain words and describe_calibration's line; the error counted and said so.
    assert "Conformal rule" in page and "21 held-out good images" in page and "at most 4.5 %" in page
    assert calibration.describe().replace("<=", "&lt;=") in page
    assert any("1 image(s) got the verdict error" in note for note in parser.notes)
    # The section comes after the facts and before the metrics.
    assert page.index('<p class="facts">') < page.index("Verdicts at the threshold") < page.index("<h2>Metrics")


def test_histogram_threshold_is_labelled_with_rule_and_measured_rates(tmp_path: Path) -> None:
    calibration = calibrate(HELD_OUT, false_alarm_rate=0.05)
    page, parser = _write(tmp_path, _records(calibration.threshold), calibration)
    assert parser.label == ["threshold (conformal 5 %)", "10 % false alarms, 25 % missed"]
    x, width = float(parser.label_box["x"]), float(parser.label_box["width"])
    assert x >= report._LEFT and x + width <= report._W - report._RIGHT
    # The bars leave room for the label: none reaches up into its box.
    bottom = float(parser.label_box["y"]) + float(parser.label_box["height"])
    svg = page[page.index('data-plot="histogram"') :]
    bars = re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="[\d.]+" fill="#', svg)
    assert len(bars) > 3 and min(float(y) for y in bars) > bottom


@pytest.mark.parametrize("where", [0.0, 0.35, 0.5, 0.65, 1.0])
def test_threshold_label_stays_inside_the_plot_area(tmp_path: Path, where: float) -> None:
    """Wherever the line falls, even in the middle where neither side has room, the label's box
    lies inside the plot area, is wide enough for its longest line and sits below the title."""
    lines = ["threshold (recall 95 %)", "100 % false alarms, 16.7 % missed"]
    x = report._LEFT + where * (report._W - report._LEFT - report._RIGHT)
    svg = report._line_label(x, lines)
    left, top, width = (float(v) for v in re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)"', svg)[0])
    assert left >= report._LEFT and left + width <= report._W - report._RIGHT
    assert top > report._TOP and width >= 0.45 * 11 * len(lines[1])
    spans = [float(v) for v in re.findall(r'<tspan x="[\d.]+" y="([\d.]+)"', svg)]
    assert len(spans) == 2 and spans[0] < spans[1] < report._H - report._BOTTOM


def test_recall_rule_states_the_miss_bound_and_warns_when_rates_exceed_bounds(tmp_path: Path) -> None:
    defects = np.linspace(1.5, 9.0, 40)  # 40 held-out defects: target recall 0.9 takes the 4th (~2.27)
    calibration = calibrate(HELD_OUT, rule="recall", target_recall=0.9, defect_scores=defects)
    # Every good test image scores above the threshold: far more false alarms than the 1/22 held-out ones.
    records = [Record.of(f"good/{i}.png", "c", 5.0, 5.0, calibration.threshold, label=0) for i in range(20)]
    records += [Record.of(f"bad/{i}.png", "c", 8.0, 8.0, calibration.threshold, label=1) for i in range(5)]
    page, parser = _write(tmp_path, records, calibration)
    assert "Recall rule" in page and "40 held-out defective images" in page
    rates = _rates(parser)
    assert rates["false_alarms"][0] == "20 / 20" and rates["misses:defect"][0] == "0 / 5"
    assert _percent(rates["misses"][3].removeprefix("at most")) == pytest.approx(calibration.miss_bound, abs=0.0005)
    stated = calibration.false_alarm_bound
    assert stated < rate_interval(20, 20)[0]
    assert any("false-alarm rate is above the stated bound" in note for note in parser.notes)
    assert parser.label[0] == "threshold (recall 90 %)"
    assert 'data-rate="false_alarms" class="over"' in page


def test_calibration_notes_are_shown(tmp_path: Path) -> None:
    calibration = calibrate([1.0, 1.2, 1.4, 1.6, 1.8], false_alarm_rate=0.05)  # too few for 5 %
    assert calibration.notes
    _, parser = _write(tmp_path, _records(calibration.threshold), calibration)
    assert f"note: {calibration.notes[0]}" in parser.notes


@pytest.mark.parametrize("with_error", [False, True])
def test_without_a_threshold_the_section_says_so(tmp_path: Path, with_error: bool) -> None:
    records = _records(None)  # its NaN score still gets the verdict error
    if not with_error:
        records = [r for r in records if r.verdict != "error"]
    assert verdict_summary(records) is None  # no threshold: no false alarms or misses to count
    page, parser = _write(tmp_path, records, None)
    assert "no-verdicts" in parser.ids and "has no calibrated threshold" in page
    assert "rates" not in parser.tables and "confusion" not in parser.tables
    assert parser.label == [] and "threshold-label" not in page
    assert "Verdicts at the threshold" in page


def test_text_is_escaped_and_the_page_is_self_contained(tmp_path: Path) -> None:
    hostile = '<img src="http://x/y.png" onerror="alert(1)">'
    calibration = calibrate(HELD_OUT, false_alarm_rate=0.05)
    threshold = calibration.threshold
    records = [Record.of(f"good/{i}.png", "c", 1.0 + i / 10, 1.0, threshold, label=0) for i in range(10)]
    records += [Record.of(f"b/{i}.png", "c", 3.0, 3.0, threshold, label=1, defect_type=hostile) for i in range(3)]
    summary_calibration = dataclasses.replace(calibration, notes=(f"held out {hostile}",))
    page, parser = _write(tmp_path, records, summary_calibration, run=hostile)
    assert hostile not in page and 'onerror="alert' not in page
    assert _rates(parser)[f"misses:{hostile}"][0] == "0 / 3"  # the parsed (unescaped) text is the name
    assert f"note: held out {hostile}" in parser.notes
    assert "<script" not in page and "<link" not in page
    assert re.findall(r"(?:src|href)=\"https?:", page) == []


def test_a_confidence_is_said_in_words(tmp_path: Path) -> None:
    calibration = calibrate(np.linspace(1.0, 2.0, 60), false_alarm_rate=0.1, confidence=0.9)
    page, _ = _write(tmp_path, _records(calibration.threshold), calibration)
    assert "to hold for this calibration with 90 % confidence" in page
