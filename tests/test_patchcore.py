"""PatchCore on real images: it separates defects from good parts, localises them, and round-trips to disk."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope import PatchCore, load
from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
from defectscope.errors import ModelFileError
from defectscope.evaluate import evaluate
from defectscope.methods.base import split_calibration


@pytest.fixture(scope="module")
def fitted(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PatchCore, Path]:
    det = PatchCore(image_size=128, coreset_ratio=0.1).fit(example_root)
    run = det.save(tmp_path_factory.mktemp("run") / "bottle")
    return det, run


def test_separates_and_localises_on_bundled_example(fitted: tuple[PatchCore, Path], example_root: Path) -> None:
    det, _ = fitted
    result = evaluate(det, mvtec_samples(example_root, "test"))
    assert result.metrics["image_auroc"] >= 0.95
    assert result.metrics["pixel_auroc"] >= 0.93
    assert result.metrics["aupro"] >= 0.75
    assert len(result.records) == len(mvtec_samples(example_root, "test"))


def test_memory_bank_is_the_coreset_share_of_the_patches(fitted: tuple[PatchCore, Path], example_root: Path) -> None:
    det, _ = fitted
    batch = next(iterate_batches(ImageDataset(mvtec_samples(example_root, "test")[:3], 128), 3))
    assert det.predict(batch).verdicts.dtype == torch.bool
    assert det.calibration is not None and det.calibration.n_images == det.fit_info["n_calibration_images"] >= 1
    n_fit = det.fit_info["n_fit_images"]
    assert det.memory_bank.shape[0] == round(n_fit * 16 * 16 * 0.1)


def _copy_run(run: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in run.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_tampered_truncated_and_missing_model_files(fitted: tuple[PatchCore, Path], tmp_path: Path) -> None:
    _, run = fitted
    tampered = _copy_run(run, tmp_path / "tampered")
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="model.safetensors.*checksum"):
        load(tampered)

    truncated = _copy_run(run, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load(truncated)

    bad_json = _copy_run(run, tmp_path / "badjson")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json.*JSON"):
        load(bad_json)

    unknown = _copy_run(run, tmp_path / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["method"] = "nonsense"
    (unknown / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="unknown method"):
        load(unknown)

    with pytest.raises(ModelFileError, match="no such model folder"):
        load(tmp_path / "nowhere")


def test_calibration_split_is_seeded_and_disjoint(example_root: Path) -> None:
    samples = mvtec_samples(example_root, "train")
    fit_a, cal_a = split_calibration(samples, 0.1, 0)
    _fit_b, cal_b = split_calibration(samples, 0.1, 0)
    assert cal_a == cal_b and not set(fit_a) & set(cal_a)
    assert len(fit_a) + len(cal_a) == len(samples) and len(cal_a) == 3


def test_real_bottle_subset(bottle_root: Path) -> None:
    """Fit on 40 real training images at 128 px; the full bottle test split is scored."""
    train = mvtec_samples(bottle_root, "train")[::5]
    det = PatchCore(image_size=128).fit(train)
    test = mvtec_samples(bottle_root, "test")
    result = evaluate(det, test)
    assert result.metrics["image_auroc"] >= 0.97
    assert result.metrics["pixel_auroc"] >= 0.95
    scores = np.array([r.score for r in result.records])
    labels = np.array([r.label for r in result.records])
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
