"""The run layer: fit, test and predict a run from Python, typed records, unified runs, safe outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from defectscope import load
from defectscope.cli import main
from defectscope.errors import DataError, OutputError
from defectscope.runs import EvalResult, Record, RunInfo, evaluate_run, fit_run, format_records, judge, predict_run

PARAMS = {"backbone": "mobilenet_v2", "image_size": 64, "num_neighbors": 3}


@pytest.fixture(scope="module")
def fitted(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    fit_run(example_root, out, params=PARAMS)
    return out


def test_three_lines_fit_test_predict(fitted: Path, example_root: Path, tmp_path: Path) -> None:
    result = evaluate_run(fitted, out=tmp_path / "t", overlays=False)
    assert isinstance(result, EvalResult) and len(result.parts) == 1
    assert result.parts[0].metrics["image_auroc"] > 0.8
    assert all(isinstance(r, Record) and r.verdict in ("good", "anomalous") for r in result.records)
    assert {r.defect_type for r in result.records} >= {"good", "broken_large"}
    good = sorted((example_root / "test" / "good").iterdir())[:2]
    records = predict_run(fitted, good).records
    assert [Path(r.path).name for r in records] == [p.name for p in good]
    assert records[0].category == "bottle_small" and records[0].threshold == result.parts[0].threshold


def test_run_info_is_typed_and_saved(fitted: Path, example_root: Path) -> None:
    config = json.loads((fitted / "config.json").read_text())
    info = RunInfo.from_dict(config["run"], "config.json")
    assert info.method == "patchcore" and info.categories == ["bottle_small"]
    assert [Path(d).name for d in info.data] == ["bottle_small"] and info.image_size == 64
    assert info.n_fit_images + info.n_calibration_images == len(list((example_root / "train" / "good").iterdir()))
    assert info.versions["defectscope"] and info.fit_date.startswith("20")
    assert "category_dirs" not in config["fit_info"] and "data" not in config["fit_info"]


def test_record_formats_agree(fitted: Path, example_root: Path) -> None:
    record = predict_run(fitted, [sorted((example_root / "test" / "good").iterdir())[0]]).records[0]
    as_json = json.loads(format_records([record], "json"))[0]
    header = format_records([record], "csv").splitlines()[0].split(",")
    assert list(as_json) == header
    assert {"path", "category", "score", "normalized_score", "verdict", "threshold", "overlay"} <= set(header)
    assert "label" not in header
    assert "label" in format_records([record], "csv", labelled=True).splitlines()[0]


def test_non_finite_scores_are_errors_never_good(fitted: Path, example_root: Path, tmp_path: Path) -> None:
    assert judge(float("nan"), 1.0)[0] == "error" and judge(float("inf"), 1.0)[0] == "error"
    assert judge(0.0, 0.5) == ("good", None) and judge(1.0, 0.5) == ("anomalous", None)
    assert judge(0.2, None) == (None, None)  # no threshold: no verdict, never good
    detector = load(fitted)
    detector._index.bank[:] = float("nan")  # a damaged bank in memory
    result = evaluate_run(fitted, out=tmp_path / "t", overlays=False, detector=detector)
    assert result.n_errors == len(result.records) > 0
    assert all(r.verdict == "error" and r.reason and r.normalized_score is None for r in result.records)
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())  # strict JSON, no bare NaN
    assert metrics["n_errors"] == len(result.records)
    assert "error" in (tmp_path / "t" / "report.html").read_text()


def test_cli_exits_3_when_an_image_errored(
    fitted: Path, example_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import defectscope.runs.info as loading  # where every run loads its model

    def damaged(folder: Path):  # type: ignore[no-untyped-def]
        detector = load(folder)
        detector._index.bank[:] = float("nan")
        return detector

    monkeypatch.setattr(loading, "load", damaged)
    image = sorted((example_root / "test" / "good").iterdir())[0]
    assert main(["predict", str(fitted), str(image)]) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["verdict"] == "error"
    assert "verdict error" in captured.err


def test_same_names_get_distinct_heatmaps(fitted: Path, example_root: Path, tmp_path: Path) -> None:
    first = sorted((example_root / "test" / "good").iterdir())[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(first, tmp_path / "a" / first.name)
    shutil.copy(sorted((example_root / "test" / "broken_large").iterdir())[0], tmp_path / "b" / first.name)
    records = predict_run(fitted, [tmp_path / "a", tmp_path / "b"], heatmaps=tmp_path / "h").records
    overlays = [r.overlay for r in records]
    assert len(set(overlays)) == 2 and all(Path(o).is_file() for o in overlays)  # type: ignore[arg-type]
    assert Path(overlays[0]).read_bytes() != Path(overlays[1]).read_bytes()  # type: ignore[arg-type]


def test_outputs_never_replace_the_users_files(fitted: Path, example_root: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("my own notes")
    with pytest.raises(OutputError, match="not a defectscope output folder"):
        evaluate_run(fitted, out=mine, overlays=False)
    assert (mine / "metrics.json").read_text() == "my own notes"
    with pytest.raises(OutputError, match="already holds a fitted model"):
        fit_run(example_root, fitted, params=PARAMS)
    evaluate_run(fitted, out=mine, overlays=False, overwrite=True)
    assert json.loads((mine / "metrics.json").read_text())["n_images"] > 0


def test_output_folder_is_checked_before_the_work(example_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        fit_run(example_root, blocker / "run", params=PARAMS)
    assert blocker.read_text() == "x"


@pytest.fixture(scope="module")
def two_categories(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two")
    for name in ("alpha", "beta"):
        shutil.copytree(example_root, root / name, ignore=shutil.ignore_patterns("*.txt", "*.md"))
    return root


def test_unified_run_tests_and_predicts_like_it_fits(two_categories: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit_run(two_categories, run, categories="all", params=PARAMS)
    result = evaluate_run(run, two_categories, out=tmp_path / "t", overlays=False)  # the root, no --category
    assert [p.name for p in result.parts] == ["alpha", "beta"]
    assert set(result.mean_metrics) >= {"image_auroc"}
    assert (tmp_path / "t" / "alpha" / "metrics.json").is_file()
    records = predict_run(run, [two_categories]).records
    assert {r.category for r in records} == {"alpha", "beta"}
    n_test = sum(1 for _ in (two_categories / "alpha" / "test").rglob("*.png"))
    assert len(records) == 2 * n_test


def test_root_without_the_models_categories_is_refused(fitted: Path, two_categories: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="none of which this model was fitted on"):
        evaluate_run(fitted, two_categories, out=tmp_path / "t")


def test_predicted_scores_equal_the_detectors(fitted: Path, example_root: Path) -> None:
    from defectscope.data import ImageDataset, mvtec_samples

    samples = mvtec_samples(example_root, "test")[:3]
    detector = load(fitted)
    batch = torch.stack([ImageDataset(samples, 64)[i]["image"] for i in range(3)])
    expected = detector.predict(batch).scores
    got = torch.tensor([r.score for r in predict_run(fitted, [s.path for s in samples]).records])
    assert torch.allclose(got, expected, rtol=1e-5)


def test_missing_weights_are_found_before_the_run_folder_is_made(example_root: Path, tmp_path: Path) -> None:
    from defectscope.errors import WeightsError

    with pytest.raises(WeightsError, match="nope.pth"):
        fit_run(example_root, tmp_path / "run", params={**PARAMS, "weights": str(tmp_path / "nope.pth")})
    assert not (tmp_path / "run").exists()


def test_a_model_without_threshold_says_so_and_gives_no_verdicts(
    example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted((example_root / "train" / "good").iterdir())[0], one / "000.png")
    assert (
        main(["fit", str(one), "--out", str(tmp_path / "r"), "--image-size", "64", "--backbone", "mobilenet_v2"]) == 0
    )
    assert "no calibrated threshold" in capsys.readouterr().err
    image = sorted((example_root / "test" / "broken_large").iterdir())[0]
    assert main(["predict", str(tmp_path / "r"), str(image)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["verdict"] is None
    assert "no calibrated threshold" in captured.err
