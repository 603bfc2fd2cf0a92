"""``predict --engine ray`` against a real local Ray runtime (2 CPUs): the records equal the local
engine's, results stream to the file, a rerun after a crash scores only what is missing."""

import json
import os
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed (pip install defectscope[ray])")

from defectscope.cli import main  # noqa: E402
from defectscope.distributed import ResultsFile, predict_ray, read_results  # noqa: E402
from defectscope.errors import DefectscopeError, OutputError  # noqa: E402
from defectscope.runs import fit_run, predict_run  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> object:
    os.environ["DEFECTSCOPE_NO_PROGRESS"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ray") / "run"
    fit_run(example_root, folder, method="padim", params={"image_size": 64})
    return folder


def as_local(run: Path, example_root: Path) -> dict[str, dict]:
    return {r.path: r.to_dict(False) for r in predict_run(run, [example_root]).records}


def assert_same(rows: list[dict], local: dict[str, dict]) -> None:
    assert sorted(r["path"] for r in rows) == sorted(local)
    for row in rows:
        expected = local[row["path"]]
        assert set(row) == set(expected)
        for key, value in expected.items():
            if key in ("score", "max_pixel_score", "normalized_score", "threshold"):
                assert row[key] == pytest.approx(value, rel=1e-6, abs=0), key
            else:
                assert row[key] == value, key


def test_records_equal_the_local_engine(cluster: object, run: Path, example_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.jsonl"
    result = predict_ray(run, [example_root], out, workers=2)
    local = as_local(run, example_root)
    assert len(result.scored) == len(local) == 17 and result.skipped == 0
    assert_same(read_results(out), local)
    assert {r["verdict"] for r in read_results(out)} == {"good", "anomalous"}


def test_a_rerun_after_a_crash_scores_only_the_missing_images(
    cluster: object, run: Path, example_root: Path, tmp_path: Path
) -> None:
    """The file a crash left (five complete records, the sixth cut off mid-line) is kept: the rerun
    drops the partial line, leaves the five untouched and appends the other twelve."""
    local = as_local(run, example_root)
    first = [json.dumps(row) + "\n" for row in list(local.values())[:5]]
    out = tmp_path / "scores.jsonl"
    out.write_text("".join(first) + '{"path": "/cut/off', encoding="utf-8")
    result = predict_ray(run, [example_root], out, workers=2)
    assert result.skipped == 5 and len(result.scored) == 12
    text = out.read_text(encoding="utf-8")
    assert text.startswith("".join(first)) and "/cut/off" not in text
    assert_same(read_results(out), local)
    again = predict_ray(run, [example_root], out, workers=2)
    assert again.skipped == 17 and again.scored == []
    assert out.read_text(encoding="utf-8") == text


def test_cli_writes_csv_that_equals_the_local_csv(
    cluster: object, run: Path, example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.csv"
    assert main(["predict", str(run), str(example_root), "--engine", "ray", "--workers", "2", "--out", str(out)]) == 0
    assert "wrote 17 predictions" in capsys.readouterr().err
    rows = read_results(out)
    local = as_local(run, example_root)
    assert sorted(r["path"] for r in rows) == sorted(local)
    for row in rows:
        assert float(row["score"]) == pytest.approx(local[row["path"]]["score"], rel=1e-6)
        assert row["verdict"] == local[row["path"]]["verdict"] and row["engine"] == "torch"


def test_bad_targets_are_one_line_errors(
    cluster: object, run: Path, example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(OutputError, match=r"\.jsonl or \.csv"):
        ResultsFile(tmp_path / "scores.json")
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("my own notes\n", encoding="utf-8")
    with pytest.raises(OutputError, match="line 1: not a JSON record"):
        predict_ray(run, [example_root], foreign)
    assert foreign.read_text(encoding="utf-8") == "my own notes\n"  # never overwritten without --overwrite
    with pytest.raises(DefectscopeError):  # not a run folder: --overwrite removes nothing before that is known
        predict_ray(tmp_path / "no-run", [example_root], foreign, overwrite=True)
    assert foreign.read_text(encoding="utf-8") == "my own notes\n"
    assert main(["predict", str(run), str(example_root), "--engine", "ray"]) != 0
    assert "--engine ray writes its results to a file" in capsys.readouterr().err


def test_padim_fitted_on_ray_workers_equals_the_single_process_fit(
    cluster: object, run: Path, example_root: Path, tmp_path: Path
) -> None:
    from defectscope import load
    from defectscope.distributed import RayShards

    shards = RayShards(workers=2)
    fitted = fit_run(example_root, tmp_path / "ray-run", method="padim", params={"image_size": 64}, shards=shards)
    single = load(run)
    assert fitted.detector.fit_info["n_fit_images"] == single.fit_info["n_fit_images"]
    torch.testing.assert_close(fitted.detector.mean, single.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fitted.detector.whitener, single.whitener, rtol=1e-4, atol=1e-4)
    assert torch.equal(fitted.detector.channels, single.channels)
    assert fitted.detector.calibration.threshold == pytest.approx(single.calibration.threshold, rel=1e-5)
    with pytest.raises(DefectscopeError, match="fitted in one process"):
        fit_run(example_root, tmp_path / "no", method="spade", params={"image_size": 64}, shards=shards)


def test_merged_sums_equal_one_accumulator() -> None:
    from defectscope.nn.gaussian import StreamingGaussian

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 5, generator=generator) * 3 + 100  # far from zero: the shifts matter
    whole = StreamingGaussian()
    whole.update(x)
    parts = []
    for chunk in (x[:7], x[7:25], x[25:]):
        g = StreamingGaussian()
        g.update(chunk)
        parts.append(g.state())
    merged = StreamingGaussian.merged([StreamingGaussian().state(), *parts])
    assert merged.count == 40
    torch.testing.assert_close(merged.mean(), whole.mean(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=1e-10, atol=1e-10)


def test_patchcore_composable_coreset_covers_like_the_single_process_one(
    cluster: object, example_root: Path, tmp_path: Path
) -> None:
    """Greedy k-center on each worker's patches, then on the union: the same bank size, and every
    training patch about as close to it as to the one-process coreset (radius and mean distance)."""
    from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
    from defectscope.distributed import RayShards
    from defectscope.evaluate import evaluate
    from defectscope.nn.coreset import coverage

    params = {"image_size": 64, "coreset_ratio": 0.05, "calibration_fraction": 0.0}
    ray_fit = fit_run(example_root, tmp_path / "ray", method="patchcore", params=params, shards=RayShards(workers=2))
    single = fit_run(example_root, tmp_path / "one", method="patchcore", params=params)
    a, b = ray_fit.detector, single.detector
    assert a.fit_info["distributed_coreset"] == {"workers": 2, "patches": 30 * 64, "union": 2 * 96}
    assert len(a.index) == len(b.index) == 96
    train = mvtec_samples(example_root, "train")
    images = next(iterate_batches(ImageDataset(train, 64), len(train)))["image"]
    with torch.no_grad():
        emb = b.embed(images)
    patches = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    (ray_max, ray_mean), (one_max, one_mean) = coverage(patches, a.index.bank), coverage(patches, b.index.bank)
    # greedy k-center bounds the two-round radius by 4x the optimum; on these 30 small images it is within 12 %
    assert ray_max <= 1.2 * one_max and ray_mean <= 1.1 * one_mean, (ray_max, one_max, ray_mean, one_mean)
    assert evaluate(a, mvtec_samples(example_root, "test")).metrics["image_auroc"] >= 0.95


def test_test_on_ray_gives_the_local_metrics_records_and_report(
    cluster: object, run: Path, example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``test --engine ray``: the images scored on 2 workers, the metrics, predictions.csv and the report's
    overlays written on the driver as by the local engine."""
    from defectscope.runs import evaluate_run

    local = evaluate_run(run, example_root, out=tmp_path / "local")
    args = ["test", str(run), str(example_root), "--engine", "ray", "--workers", "2", "--out", str(tmp_path / "ray")]
    assert main(args) == 0
    assert "images/s" in capsys.readouterr().out
    on_ray = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    want = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert on_ray["n_images"] == want["n_images"] == 17
    for key, value in want["metrics"].items():
        assert on_ray["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    ray_rows = (tmp_path / "ray" / "predictions.csv").read_text().splitlines()
    local_rows = (tmp_path / "local" / "predictions.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in ray_rows] == [r.split(",")[0] for r in local_rows]  # the same order
    assert sorted(p.name for p in (tmp_path / "ray" / "overlays").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "overlays").iterdir()
    )
    assert [r.score for r in local.records] == pytest.approx(
        [float(r.split(",")[ray_rows[0].split(",").index("score")]) for r in ray_rows[1:]], rel=1e-6
    )
