"""PaDiM on real images: streaming Gaussians match numpy, it separates and localises defects, and round-trips."""

from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope import PaDiM
from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
from defectscope.errors import DefectscopeError
from defectscope.evaluate import evaluate
from defectscope.nn.gaussian import StreamingGaussian, mahalanobis, whitening


@pytest.fixture(scope="module")
def fitted(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PaDiM, Path]:
    det = PaDiM(image_size=128).fit(example_root)
    return det, det.save(tmp_path_factory.mktemp("run") / "padim")


def test_streaming_covariance_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    # Far-from-zero mean and unequal batches: the shifted float64 sums must not lose precision.
    data = rng.normal(1000.0, 0.5, size=(37, 6, 5)) @ rng.normal(size=(5, 5))
    gaussian = StreamingGaussian()
    for part in np.split(data, [10, 11, 30]):
        gaussian.update(torch.from_numpy(part).float())
    x = data.astype(np.float32).astype(np.float64)
    for p in range(data.shape[1]):
        np.testing.assert_allclose(
            gaussian.covariance()[p].numpy(), np.cov(x[:, p], rowvar=False), rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(gaussian.mean()[p].numpy(), x[:, p].mean(0), rtol=1e-9)
    assert gaussian.count == 37


def test_mahalanobis_matches_the_definition() -> None:
    rng = np.random.default_rng(1)
    cov = np.stack([a @ a.T for a in rng.normal(size=(3, 4, 4))])
    mean = rng.normal(size=(3, 4))
    x = rng.normal(size=(2, 3, 4))
    dist = mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), whitening(torch.from_numpy(cov), 0.01))
    for n in range(2):
        for p in range(3):
            diff = x[n, p] - mean[p]
            expected = np.sqrt(diff @ np.linalg.inv(cov[p] + 0.01 * np.eye(4)) @ diff)
            assert dist[n, p].item() == pytest.approx(expected, rel=1e-9)


def test_fitted_gaussians_are_the_numpy_covariance_of_the_features(example_root: Path) -> None:
    """Streaming over batches of 4 gives the regularised np.cov of the same features, per position."""
    train = mvtec_samples(example_root, "train")[:9]
    det = PaDiM(image_size=64, n_channels=12, batch_size=4, calibration_fraction=0.0).fit(train)
    feats = torch.cat([det.embed(b["image"]) for b in iterate_batches(ImageDataset(train, 64), 9)])
    x = feats.flatten(2).permute(2, 0, 1).double().numpy()  # (P, N, d)
    assert x.shape == (64, 9, 12)
    precision = (det.whitener.double().transpose(1, 2) @ det.whitener.double()).numpy()
    for p in (0, 27, 63):
        expected = np.linalg.inv(np.cov(x[p], rowvar=False) + 0.01 * np.eye(12))
        np.testing.assert_allclose(precision[p], expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
        np.testing.assert_allclose(det.mean[p].numpy(), x[p].mean(0), rtol=1e-5, atol=1e-5)


def test_channel_subset_is_seeded_and_optional(example_root: Path) -> None:
    train = mvtec_samples(example_root, "train")[:4]
    subset = PaDiM(image_size=64, n_channels=10, calibration_fraction=0.0).fit(train)
    full = PaDiM(image_size=64, n_channels=None, calibration_fraction=0.0).fit(train)
    assert subset.mean.shape == (64, 10) and full.mean.shape == (64, 40 + 112)
    assert torch.equal(full.channels, torch.arange(152))
    assert torch.equal(subset.channels, PaDiM(n_channels=10)._select_channels(152))
    assert not torch.equal(subset.channels, PaDiM(n_channels=10, seed=1)._select_channels(152))
    assert torch.equal(subset.channels, subset.channels.sort().values) and subset.channels.unique().numel() == 10
    with pytest.raises(DefectscopeError, match="at least 2"):
        PaDiM(image_size=64, calibration_fraction=0.0).fit(train[:1])


def test_separates_and_localises_on_bundled_example(fitted: tuple[PaDiM, Path], example_root: Path) -> None:
    det, _ = fitted
    result = evaluate(det, mvtec_samples(example_root, "test"))
    assert result.metrics["image_auroc"] >= 0.95
    assert result.metrics["pixel_auroc"] >= 0.96
    assert result.metrics["aupro"] >= 0.85
    scores = np.array([r.score for r in result.records])
    maps_max = np.array([r.max_pixel_score for r in result.records])
    np.testing.assert_allclose(scores, maps_max, rtol=1e-6)  # image score = map maximum
