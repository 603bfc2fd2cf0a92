"""One model over several categories, and labelled defects kept out of evaluation."""

import json
from pathlib import Path

import pytest

from defectscope.cli import main
from defectscope.data.sources import pick_labelled_defects, resolve_categories
from defectscope.errors import DataError
from defectscope.methods import load


@pytest.fixture(scope="module")
def two_categories(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plant")
    (root / "cap").symlink_to(example_root)
    (root / "neck").symlink_to(example_root)
    (root / "notes").mkdir()  # not a category: ignored by --categories all
    return root


def test_resolve_categories(two_categories: Path) -> None:
    assert [p.name for p in resolve_categories([two_categories], categories="all")] == ["cap", "neck"]
    assert [p.name for p in resolve_categories([two_categories], categories="neck")] == ["neck"]
    with pytest.raises(DataError, match="no such category"):
        resolve_categories([two_categories], categories="cap,lid")
    with pytest.raises(DataError, match="appears twice"):
        resolve_categories([two_categories / "cap", two_categories / "cap"])


def test_labelled_defects_are_seeded_per_category(two_categories: Path) -> None:
    dirs = resolve_categories([two_categories], categories="all")
    first = pick_labelled_defects(dirs, 2, seed=0)
    assert first == pick_labelled_defects(dirs, 2, seed=0)
    assert [s.category for s in first] == ["cap", "cap", "neck", "neck"]
    assert all(s.label == 1 and s.mask_path is not None for s in first)
    with pytest.raises(DataError, match="fewer than the 99 requested"):
        pick_labelled_defects(dirs, 99)


def test_unified_fit_and_per_category_test(two_categories: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                str(two_categories),
                "--categories",
                "all",
                "--out",
                str(run),
                "--image-size",
                "64",
                "--backbone",
                "mobilenet_v2",
            ]
        )
        == 0
    )
    detector = load(run)
    assert detector.fit_info["categories"] == ["cap", "neck"]
    assert detector.fit_info["n_fit_images"] + detector.fit_info["n_calibration_images"] == 60
    assert main(["test", str(run), "--no-overlays"]) == 0
    summary = json.loads((run / "test" / "metrics.json").read_text())
    assert set(summary["per_category"]) == {"cap", "neck"}
    auroc = [m["image_auroc"] for m in summary["per_category"].values()]
    assert summary["mean_metrics"]["image_auroc"] == pytest.approx(sum(auroc) / 2)
    assert (run / "test" / "cap" / "report.html").is_file()
    assert "mean" in capsys.readouterr().out
