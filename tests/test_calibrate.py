"""Re-setting a fitted run's threshold: from more images, a new rule, atomically, with a history."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from defectscope import load
from defectscope.cli import main
from defectscope.errors import DataError, DefectscopeError
from defectscope.runs import calibrate_run, evaluate_run, fit_run, predict_run
from defectscope.thresholds import calibrate

PARAMS = {"backbone": "mobilenet_v2", "image_size": 64, "num_neighbors": 3}


@pytest.fixture(scope="module")
def base_run(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calibrate") / "run"
    fit_run(example_root, out, params={**PARAMS, "calibration_fraction": 0.2})
    return out


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_new_rate_from_the_stored_scores_keeps_the_old_threshold_in_the_history(run: Path) -> None:
    before = load(run).calibration
    assert before is not None and before.rule == "conformal" and before.good_scores is not None
    tensors = (run / "model.safetensors").read_bytes()
    result = calibrate_run(run, false_alarm_rate=0.3)
    n = before.n_images
    assert result.after.threshold == calibrate(before.good_scores, false_alarm_rate=0.3).threshold
    assert result.after.threshold == before.good_scores[-(-(n + 1) * 7 // 10) - 1]  # ceil(0.7 (n + 1))-th
    assert (run / "model.safetensors").read_bytes() == tensors  # only config.json changes
    config = _config(run)
    assert config["params"]["false_alarm_rate"] == 0.3 and config["calibration"]["false_alarm_rate"] == 0.3
    (entry,) = config["calibration_history"]
    assert entry["threshold"] == before.threshold and entry["false_alarm_rate"] == 0.05 and entry["replaced"]
    assert load(run).calibration == result.after


def test_more_good_images_are_added_and_then_left_out_of_test(run: Path, example_root: Path) -> None:
    extra = sorted((example_root / "test" / "good").iterdir())[:4]
    before = load(run).calibration
    result = calibrate_run(run, [str(p) for p in extra])
    assert result.n_new_good == 4 and result.after.n_images == before.n_images + 4
    assert set(before.good_scores) < set(result.after.good_scores)
    assert _config(run)["calibration_images"] == [str(p) for p in extra]
    tested = evaluate_run(run, overlays=False)
    assert len(tested.records) == len(list((example_root / "test").rglob("*.png"))) - 4
    assert any("`defectscope calibrate` scored into the threshold" in n for n in tested.parts[0].notes)
    records = predict_run(run, [extra[0]]).records
    assert records[0].rule == "conformal" and records[0].threshold == result.after.threshold
    with pytest.raises(DataError, match="already part of this model"):
        calibrate_run(run, [str(extra[0])])


def test_replace_uses_only_the_new_images(run: Path, example_root: Path) -> None:
    extra = sorted((example_root / "test" / "good").iterdir())
    result = calibrate_run(run, [str(example_root / "test" / "good")], replace_scores=True, false_alarm_rate=0.2)
    assert result.after.n_images == len(extra) and _config(run)["calibration_history"][0]["replaced_scores"] is True


def test_defects_measure_the_miss_rate_or_set_a_recall_threshold(run: Path, example_root: Path) -> None:
    defects = [str(p) for p in sorted((example_root / "test").glob("[bc]*"))]
    result = calibrate_run(run, defects=defects)
    miss = result.after.miss_estimate
    assert miss is not None and miss.n == 9 and result.n_new_defects == 9
    scores = sorted(result.after.defect_scores)
    assert miss.count == sum(s <= result.after.threshold for s in scores)
    recall = calibrate_run(run, target_recall=0.8)
    assert recall.after.rule == "recall" and recall.after.threshold == scores[1]  # j = floor(0.2 * 10) = 2
    assert recall.after.miss_bound == pytest.approx(0.2) and load(run).threshold_rule == "recall"
    assert len(_config(run)["calibration_history"]) == 2


def test_cli_prints_before_and_after(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(run), "--rule", "mean_sigma"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("before: threshold") and "\nnow:    threshold" in out and "mean_sigma" in out
    assert _config(run)["calibration"]["rule"] == "mean_sigma"


def test_a_model_without_stored_scores_needs_new_good_images(run: Path, example_root: Path) -> None:
    config = _config(run)
    for key in ("threshold_rule", "false_alarm_rate", "target_recall"):
        config["params"].pop(key)
    older = calibrate(config["calibration"]["good_scores"], rule="mean_sigma").to_dict()
    config["calibration"] = {k: older[k] for k in ("threshold", "mean", "std", "max", "n_images", "sigmas")}
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(DefectscopeError, match="saved without its held-out scores"):
        calibrate_run(run, false_alarm_rate=0.1)
    result = calibrate_run(run, [str(example_root / "test" / "good")], false_alarm_rate=0.1)
    assert result.before is not None and result.before.rule == "mean_sigma"
    assert result.after.rule == "conformal" and result.after.n_images == 8


def test_fit_holds_labelled_defects_out_for_methods_that_do_not_learn_from_them(
    example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fit", str(example_root), "--out", str(tmp_path / "r"), "--labelled-defects", "2"]
    assert main([*argv, "--image-size", "64", "--backbone", "mobilenet_v2"]) == 0
    err = capsys.readouterr().err
    assert "held out to measure the miss rate" in err
    config = _config(tmp_path / "r")
    assert len(config["calibration"]["defect_scores"]) == 2 and len(config["run"]["labelled_defects"]) == 2
    assert main(["test", str(tmp_path / "r"), "--no-overlays"]) == 0
    out = capsys.readouterr().out
    assert "false alarms (good judged anomalous)" in out and "held-out defects missed" in out
    summary = json.loads((tmp_path / "r" / "test" / "metrics.json").read_text())
    assert summary["calibration"]["miss"]["n"] == 2 and summary["n_images"] == 17 - 2
    counts = summary["verdicts"]["counts"]
    assert sum(counts[k] for k in ("true_positive", "false_positive", "true_negative", "false_negative")) == 15


def test_confidence_is_stored_and_reloaded(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(run), "--confidence", "0.9"]) == 0
    err = capsys.readouterr().err
    assert "cannot keep the false-alarm rate under 0.05 with 90% confidence" in err
    config = _config(run)
    assert config["params"]["false_alarm_confidence"] == 0.9 and config["calibration"]["confidence"] == 0.9
    detector = load(run)
    assert detector.false_alarm_confidence == 0.9 and detector.calibration.confidence == 0.9
    config["calibration"]["confidence"] = 0.5  # no longer what the parameters say
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(DefectscopeError, match="calibration.confidence"):
        load(run)
