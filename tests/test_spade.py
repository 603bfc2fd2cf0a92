"""SPADE on real images: image kNN retrieves the right good images, maps localise defects, and it round-trips."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope import SPADE
from defectscope.data import ImageDataset, Sample, iterate_batches, mvtec_samples
from defectscope.evaluate import evaluate
from defectscope.postprocess import anomaly_maps


@pytest.fixture(scope="module")
def fitted(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SPADE, Path]:
    det = SPADE(image_size=128).fit(example_root)
    return det, det.save(tmp_path_factory.mktemp("run") / "spade")


def _pattern(kind: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One of four clearly different textures, with a little noise so that no two images are equal."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = [
        np.full((size, size, 3), (200, 40, 40)),  # red
        np.stack([((xx // 8) % 2) * 255] * 3, -1),  # vertical stripes
        np.stack([((yy // 4) % 2) * 255, np.full_like(yy, 120), np.zeros_like(yy)], -1),  # fine horizontal stripes
        np.full((size, size, 3), (30, 90, 220)),  # blue
    ][kind]
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def test_image_knn_retrieves_the_images_of_the_same_kind(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    kinds = [0, 1, 2, 3] * 3  # fitting image i is of kind i % 4
    train = []
    for i, kind in enumerate(kinds):
        path = tmp_path / f"train_{i:02d}.png"
        Image.fromarray(_pattern(kind, rng)).save(path)
        train.append(Sample(path, 0, "good", None, "synthetic"))
    det = SPADE(image_size=64, num_image_neighbors=3, calibration_fraction=0.0).fit(train)
    queries = torch.stack([torch.from_numpy(_pattern(k, rng)).permute(2, 0, 1).float() / 255 for k in range(4)])
    pooled, _ = det.embed(queries)
    dist, nearest = det.nearest_images(pooled)
    assert nearest.shape == (4, 3)
    for kind in range(4):
        assert sorted(nearest[kind].tolist()) == [i for i, k in enumerate(kinds) if k == kind]
    assert torch.all(dist[:, :-1] <= dist[:, 1:])  # nearest first
    expected = torch.cdist(pooled, det.image_index.bank)[torch.arange(4)[:, None], nearest]
    torch.testing.assert_close(dist, expected, rtol=1e-4, atol=1e-4)

    # K is capped at the number of fitting images, and the image score is the mean distance.
    det.num_image_neighbors = 50
    dist, nearest = det.nearest_images(pooled)
    assert nearest.shape == (4, len(kinds)) and sorted(nearest[0].tolist()) == list(range(len(kinds)))
    scores = det.predict(queries).scores
    torch.testing.assert_close(scores, dist.mean(1))


def test_map_is_the_distance_to_the_retrieved_images_patches(
    fitted: tuple[SPADE, Path], example_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each position scores its distance to the nearest patch of its K images (here unblurred)."""
    det, _ = fitted
    monkeypatch.setattr(det, "num_image_neighbors", 5)
    monkeypatch.setattr(det, "blur_sigma", 0.0)
    images = next(iterate_batches(ImageDataset(mvtec_samples(example_root, "test")[:2], 128), 2))["image"]
    pred = det.predict(images)
    pooled, emb = det.embed(images)
    _, nearest = det.nearest_images(pooled)
    gallery = det.patches[nearest].flatten(1, 2).float()  # (2, 5 * P, D)
    patch_scores = torch.cdist(emb.flatten(2).transpose(1, 2), gallery).amin(2).reshape(2, *emb.shape[-2:])
    torch.testing.assert_close(pred.maps, anomaly_maps(patch_scores, (128, 128), 0.0), rtol=1e-3, atol=2e-3)


def test_patch_features_are_half_precision(fitted: tuple[SPADE, Path]) -> None:
    det, _ = fitted
    n_fit = det.fit_info["n_fit_images"]
    assert det.patches.dtype == torch.float16
    assert det.patches.shape == (n_fit, 16 * 16, 40 + 112)
    assert det.image_index.bank.shape == (n_fit, 320)


def test_separates_and_localises_on_bundled_example(fitted: tuple[SPADE, Path], example_root: Path) -> None:
    det, _ = fitted
    result = evaluate(det, mvtec_samples(example_root, "test"))
    assert result.metrics["image_auroc"] >= 0.95
    assert result.metrics["pixel_auroc"] >= 0.96
    assert result.metrics["aupro"] >= 0.85
