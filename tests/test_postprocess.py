"""Shared post-processing: smoothing matches scipy, upsampling keeps size, calibration rule."""

import numpy as np
import torch
from scipy import ndimage

from defectscope.postprocess import anomaly_maps, gaussian_blur


def test_gaussian_blur_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((2, 64, 48)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), 4.0).numpy()
    # scipy's "reflect" repeats the edge pixel, torch's "reflect" does not: that is scipy's "mirror"
    ref = np.stack([ndimage.gaussian_filter(m, 4.0, mode="mirror", truncate=4.0) for m in maps])
    assert np.abs(ours - ref).max() < 1e-5


def test_anomaly_maps_upsample_and_keep_peak_location() -> None:
    patch = torch.zeros(1, 8, 8)
    patch[0, 2, 5] = 1.0
    maps = anomaly_maps(patch, (64, 64), 2.0)
    assert maps.shape == (1, 64, 64)
    y, x = np.unravel_index(int(maps[0].argmax()), (64, 64))
    assert abs(y - (2 * 8 + 4)) <= 2 and abs(x - (5 * 8 + 4)) <= 2


def test_anomaly_maps_equal_upsampling_then_blur() -> None:
    """The matrix form equals bilinear upsampling followed by the separable blur, for up- and down-sizing."""
    rng = torch.Generator().manual_seed(0)
    for h, w, size, sigma in [
        (32, 32, (256, 256), 4.0),
        (7, 13, (50, 31), 2.0),
        (40, 40, (16, 24), 1.0),
        (8, 8, (8, 8), 0),
    ]:
        scores = torch.rand(3, h, w, generator=rng) * 20
        up = torch.nn.functional.interpolate(scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        ref = gaussian_blur(up, sigma)
        assert torch.allclose(anomaly_maps(scores, size, sigma), ref, rtol=0, atol=2e-5 * 20)
