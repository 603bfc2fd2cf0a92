"""The defectscope command end to end on the bundled example, and its one-line errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from defectscope.cli import main


@pytest.fixture(scope="module")
def run(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert (
        main(
            [
                "fit",
                str(example_root),
                "--out",
                str(out),
                "--image-size",
                "128",
                "--backbone",
                "mobilenet_v2",
                "--set",
                "num_neighbors=5",
            ]
        )
        == 0
    )
    return out


def test_fit_writes_model(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    assert config["params"]["backbone"] == "mobilenet_v2" and config["params"]["num_neighbors"] == 5
    assert config["calibration"]["threshold"] > 0
    assert [Path(d).name for d in config["run"]["data"]] == ["bottle_small"]


def test_test_writes_metrics_csv_and_overlays(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["test", str(run), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "image_auroc" in printed and "aupro" in printed
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["metrics"]["image_auroc"] >= 0.9
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == summary["n_images"] == len(list((tmp_path / "overlays").glob("*.jpg")))
    assert len(list((tmp_path / "overlays" / "full").glob("*.jpg"))) == len(rows)
    assert summary["model"]["method"] == "patchcore" and summary["model"]["geometry"].startswith("square")
    assert {r["defect_type"] for r in rows} >= {"good", "broken_large"}


def test_predict_json_csv_and_heatmaps(
    run: Path, example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = example_root / "test" / "good"
    bad = sorted((example_root / "test" / "broken_large").iterdir())[0]
    assert main(["predict", str(run), str(good), str(bad), "--heatmaps", str(tmp_path / "h")]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == len(list(good.iterdir())) + 1
    assert records[-1]["verdict"] == "anomalous"
    assert all(Path(r["overlay"]).is_file() for r in records)
    assert main(["predict", str(run), str(bad), "--format", "csv", "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert rows[0]["verdict"] == "anomalous" and float(rows[0]["normalized_score"]) > 1.0


@pytest.mark.parametrize(
    "argv_tail, needle",
    [
        (["predict", "{run}", "/no/such/image.png"], "/no/such/image.png: no such file"),
        (["test", "{run}", "/no/such/dataset"], "/no/such/dataset"),
        (["predict", "/no/such/run", "x.png"], "no such model folder"),
        (["fit", "/no/such/dataset", "--out", "{tmp}/r"], "/no/such/dataset"),
        (["fit", "{example}", "--out", "{tmp}/r", "--set", "bogus=1"], "no parameter 'bogus'"),
    ],
)
def test_errors_are_one_line(argv_tail: list[str], needle: str, run: Path, example_root: Path, tmp_path: Path) -> None:
    argv = [a.format(run=run, tmp=tmp_path, example=example_root) for a in argv_tail]
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope.cli", *argv],
        capture_output=True,
        text=True,
        env={"DEFECTSCOPE_NO_PROGRESS": "1", "PATH": ""},
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("defectscope: error:") and needle in lines[0], proc.stderr


def test_help_explains_options(capsys: pytest.CaptureFixture) -> None:
    for command in ("fit", "test", "predict", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "usage: defectscope" in text
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "coreset_ratio" in capsys.readouterr().out


def test_missing_mask_needs_image_level_only(
    run: Path, example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    data = tmp_path / "bottle_small"
    shutil.copytree(example_root, data)
    removed = sorted((data / "ground_truth" / "contamination").iterdir())[0]
    removed.unlink()
    assert main(["test", str(run), str(data), "--out", str(tmp_path / "t1")]) == 2
    err = capsys.readouterr().err
    assert removed.stem.replace("_mask", "") in err and "image-level" in err.replace("_", "-")
    assert (
        main(["test", str(run), str(data), "--image-level-only", "--out", str(tmp_path / "t2"), "--no-overlays"]) == 0
    )
    captured = capsys.readouterr()
    assert "pixel metrics skipped" in captured.err
    metrics = json.loads((tmp_path / "t2" / "metrics.json").read_text())["metrics"]
    assert "image_auroc" in metrics and "pixel_auroc" not in metrics


def test_good_only_folder_gives_verdicts_without_ranking_metrics(
    run: Path, example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = example_root / "test" / "good"
    assert main(["test", str(run), "--good", str(good), "--out", str(tmp_path), "--no-overlays"]) == 0
    assert "ranking metrics skipped" in capsys.readouterr().err
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert "image_auroc" not in summary["metrics"] and "accuracy_at_threshold" in summary["metrics"]
    assert summary["n_images"] == len(list(good.iterdir()))
