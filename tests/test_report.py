"""`defectscope test` with PaDiM and SPADE end to end, and its HTML report: content, links and rendering
(the report's parts on their own: test_report_page.py, test_report_images.py)."""

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.cli import main
from defectscope.metrics import aupro, compute_metrics, compute_metrics_and_curves, roc_curve, thin_curve


def _fit_and_test(method: str, example_root: Path, root: Path) -> Path:
    """Fit and test a run through the CLI; returns the test output folder."""
    assert (
        main(
            [
                "fit",
                str(example_root),
                "--method",
                method,
                "--out",
                str(root / "run"),
                "--image-size",
                "128",
                "--backbone",
                "mobilenet_v2",
            ]
        )
        == 0
    )
    assert main(["test", str(root / "run"), "--out", str(root / "test")]) == 0
    return root / "test"


@pytest.fixture(scope="module")
def padim_test(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fit_and_test("padim", example_root, tmp_path_factory.mktemp("padim"))


@pytest.fixture(scope="module")
def spade_test(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fit_and_test("spade", example_root, tmp_path_factory.mktemp("spade"))


@pytest.fixture(params=["padim", "spade"])
def tested(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_test")


class _ReportParser(HTMLParser):
    """Collects the metric table (#metrics), image links, plots and image cards of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.images: list[str] = []
        self.plots: dict[str, int] = {}
        self.cards: list[dict[str, str]] = []
        self._in_cell = False
        self._in_metrics = False
        self._plot: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._in_metrics = a.get("id") == "metrics"
        elif tag == "td" and self._in_metrics:
            self._in_cell = True
            self.cells.append("")
        elif tag == "img" and "src" in a:  # (the viewer's image has none until it opens)
            self.images.append(a["src"])
        elif tag == "svg":
            self._plot = a["data-plot"]
            self.plots[self._plot] = 0
        elif tag == "polyline" and self._plot:
            self.plots[self._plot] = len(a["points"].split())
        elif tag == "div" and "card" in a.get("class", "").split():
            self.cards.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False
        elif tag == "table":
            self._in_metrics = False
        elif tag == "svg":
            self._plot = None

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


def test_cli_end_to_end(tested: Path, example_root: Path, capsys: pytest.CaptureFixture) -> None:
    summary = json.loads((tested / "metrics.json").read_text())
    assert summary["metrics"]["image_auroc"] >= 0.9 and summary["metrics"]["pixel_auroc"] >= 0.95
    run = tested.parent / "run"
    bad = sorted((example_root / "test" / "broken_large").iterdir())[1]
    good = sorted((example_root / "train" / "good").iterdir())[0]
    assert main(["predict", str(run), str(bad), str(good)]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["score"] > records[1]["score"]


def test_report_holds_metrics_curves_and_every_image(tested: Path) -> None:
    summary = json.loads((tested / "metrics.json").read_text())
    rows = list(csv.DictReader((tested / "predictions.csv").open()))
    parser = _ReportParser()
    parser.feed((tested / "report.html").read_text())

    table = dict(zip(parser.cells[::2], parser.cells[1::2]))
    assert table == {k: f"{v:.4f}" for k, v in summary["metrics"].items()}
    assert set(parser.plots) == {"auroc", "ap", "aupro", "histogram", "colour-bar"}
    assert all(2 <= parser.plots[k] <= 300 for k in ("auroc", "ap", "aupro"))

    # One thumbnail per card; the viewer's full-resolution overlay and input beside it.
    assert len(parser.images) == len(rows) == summary["n_images"]
    linked = parser.images + [c[key] for c in parser.cards for key in ("data-overlay", "data-input")]
    assert len(linked) == 3 * len(rows) and len(set(linked)) == len(linked)
    assert all((tested / src).is_file() for src in linked)
    assert {src for src in parser.images} == {r["overlay"] for r in rows}

    scores = [float(c["data-score"]) for c in parser.cards]
    assert len(parser.cards) == len(rows) and scores == sorted(scores, reverse=True)
    wrong = {"fp": 0, "fn": 0}
    for row in rows:
        judged, label = row["verdict"] == "anomalous", int(row["label"])
        if judged != bool(label):
            wrong["fp" if judged else "fn"] += 1
    flagged = [c["class"].split()[1] for c in parser.cards]
    assert flagged.count("fp") == wrong["fp"] and flagged.count("fn") == wrong["fn"]


def test_report_shows_the_verdicts_of_metrics_json(tested: Path) -> None:
    """The confusion counts and rates in the page are those metrics.json records for the run."""
    import re

    summary = json.loads((tested / "metrics.json").read_text())
    page = (tested / "report.html").read_text()
    verdicts, calibration = summary["verdicts"], summary["calibration"]
    assert calibration is not None and verdicts is not None
    cells = dict(re.findall(r'data-cell="(\w+)">(\d+)<', page))
    assert {k: int(v) for k, v in cells.items()} == {k: v for k, v in verdicts["counts"].items() if k != "errors"}
    for key in ("false_alarms", "misses"):
        entry = verdicts[key]
        row = re.search(rf'<tr data-rate="{key}"[^>]*>(.*?)</tr>', page)
        assert row is not None and f"{entry['count']} / {entry['n']}" in row.group(1)
    assert page.count('data-type="') == len(verdicts["misses_by_type"])
    label = re.search(r'<g class="threshold-label">(.*?)</g>', page)
    assert label is not None and f"threshold ({calibration['rule']} " in label.group(1)


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium is not installed (apt-get install -y chromium) to render the report",
)
def test_report_renders_in_headless_chromium(padim_test: Path, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={png}",
            "--window-size=1200,2000",
            (padim_test / "report.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    not_white = (pixels < 240).any(axis=2)
    assert not_white.mean() > 0.05 and pixels.std() > 20
    colours = np.unique(pixels.astype(np.int32) @ np.array([65536, 256, 1]))
    assert colours.size > 1000  # photos and heat maps, not just text


def test_curves_are_thinned_but_lie_on_the_exact_curves() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(600, int), np.ones(400, int)]
    scores = rng.normal(labels * 1.5, 1.0)
    masks = np.zeros((6, 32, 32), bool)
    masks[3:, 8:20, 10:24] = True
    maps = rng.normal(masks * 2.0, 1.0).astype(np.float32)
    image_labels, image_scores = np.array([0, 0, 0, 1, 1, 1]), np.arange(6.0)
    metrics, curves = compute_metrics_and_curves(image_labels, image_scores, masks, maps, n_points=200)
    assert metrics == compute_metrics(image_labels, image_scores, masks, maps)
    assert set(curves) == {"roc", "pr", "pro"}
    fpr, pro = curves["pro"]
    assert fpr[0] == 0.0 and fpr[-1] == pytest.approx(0.3) and fpr.size <= 200
    area = np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2 / 0.3
    assert area == pytest.approx(aupro(masks, maps), abs=0.01)

    fpr, tpr, _ = roc_curve(labels, scores)
    x, y = thin_curve(fpr, tpr, 100)
    assert x.size <= 100 and (x[0], y[0], x[-1], y[-1]) == (fpr[0], tpr[0], fpr[-1], tpr[-1])
    on_curve = {(a, b) for a, b in zip(fpr, tpr)}
    assert all((a, b) in on_curve for a, b in zip(x, y))
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)


def test_report_shows_reconstructions_of_reconstruction_methods(example_root: Path, tmp_path: Path) -> None:
    from defectscope.cli import main
    from defectscope.methods.draem import DRAEM

    DRAEM(image_size=64, base_channels=4, disc_channels=4, epochs=1, batch_size=8).fit(example_root).save(
        tmp_path / "run"
    )
    assert main(["test", str(tmp_path / "run"), str(example_root), "--out", str(tmp_path / "t")]) == 0
    page = (tmp_path / "t" / "report.html").read_text()
    shown = sorted((tmp_path / "t" / "overlays" / "reconstructions").iterdir())
    assert len(shown) == 17 and page.count('data-reconstruction="overlays/reconstructions/') == 17
    assert "the reconstruction and the overlay" in page
