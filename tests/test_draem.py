"""DRAEM: losses on known inputs, fit / predict / save / load, reconstruction, training and resume."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
from defectscope.errors import DefectscopeError
from defectscope.methods.draem import DRAEM
from defectscope.nn.blocks import EncoderDecoder
from defectscope.nn.losses import focal_loss, ssim_loss, ssim_map

SIZE = 64
SETTINGS = {"image_size": SIZE, "base_channels": 4, "disc_channels": 4, "batch_size": 8, "calibration_fraction": 0.1}


@pytest.fixture(scope="module")
def test_images(example_root: Path) -> torch.Tensor:
    samples = mvtec_samples(example_root, "test")
    picked = [s for s in samples if s.label == 0][:2] + [s for s in samples if s.label == 1][:2]
    return next(iter(iterate_batches(ImageDataset(picked, SIZE), 4, desc=None)))["image"]


@pytest.fixture(scope="module")
def fitted_run(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[DRAEM, Path]:
    """A 4-epoch fit with a checkpoint folder (shared by the tests below to keep them fast)."""
    checkpoints = tmp_path_factory.mktemp("draem_checkpoint")
    return DRAEM(epochs=4, **SETTINGS).fit(example_root, checkpoint_dir=checkpoints), checkpoints


def test_ssim_of_an_image_with_itself_is_one() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim_map(x, x), torch.ones(1), atol=1e-5)
    assert ssim_loss(x, x).abs().item() < 1e-5
    assert ssim_map(x, x).shape == (2, 3, 22, 22)  # no padding: 32 - 11 + 1
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert 0.0 < ssim_loss(x, noisy).item() < 2.0
    assert ssim_loss(x, 1 - x).item() > ssim_loss(x, noisy).item()  # inverted contrast is the worst
    with pytest.raises(ValueError, match="window"):
        ssim_loss(x[..., :8, :8], x[..., :8, :8])


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_downweights_easy_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 8, 8) > 0.7).long()
    ce = F.cross_entropy(logits, target)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), ce, atol=1e-6)
    assert focal_loss(logits, target, gamma=2.0) < ce  # every term is scaled by (1 - p_t)^2 < 1
    # a single pixel: -(1 - p)^2 log p, with p the softmax probability of the true class
    p = torch.tensor(0.25)
    one = torch.stack([torch.log(1 - p), torch.log(p)]).view(1, 2, 1, 1)
    expected = -((1 - p) ** 2) * torch.log(p)
    assert torch.allclose(focal_loss(one, torch.ones(1, 1, 1, dtype=torch.long)), expected, atol=1e-6)


def test_encoder_decoder_shapes() -> None:
    x = torch.rand(2, 6, 64, 64)
    assert EncoderDecoder(6, 2, [4, 8, 16], skips=True)(x).shape == (2, 2, 64, 64)
    assert EncoderDecoder(6, 3, [4, 8, 16, 16, 16, 16], skips=False)(x).shape == (2, 3, 64, 64)


def test_maps_in_unit_range_and_reconstruction(fitted_run: tuple[DRAEM, Path], test_images: torch.Tensor) -> None:
    det, _ = fitted_run
    info = det.fit_info
    assert info["training"]["epochs_done"] == 4 and info["training"]["stopped_by"] == "epochs"
    assert info["texture_source"] == "training images" and "DTD" in info["texture_note"]
    pred = det.predict(test_images)
    assert pred.maps.min() >= 0 and pred.maps.max() <= 1
    recon = det.reconstruct(test_images)
    assert recon.shape == test_images.shape and recon.min() >= 0 and recon.max() <= 1
    assert pred.reconstructions is not None and torch.equal(pred.reconstructions, recon)


def test_training_loss_falls(fitted_run: tuple[DRAEM, Path]) -> None:
    det, _ = fitted_run
    losses = det.training_log.epoch_losses
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_resume_loads_the_final_checkpoint_without_training(
    fitted_run: tuple[DRAEM, Path], example_root: Path, test_images: torch.Tensor
) -> None:
    det, checkpoints = fitted_run
    resumed = DRAEM(epochs=4, **SETTINGS).fit(example_root, checkpoint_dir=checkpoints, resume=True)
    training = resumed.fit_info["training"]
    assert training["resumed_from_epoch"] == 4 and training["epochs_done"] == 4
    assert resumed.training_log.epoch_losses == det.training_log.epoch_losses
    assert torch.equal(resumed.predict(test_images).scores, det.predict(test_images).scores)
    with pytest.raises(DefectscopeError, match="other settings"):
        DRAEM(epochs=4, **(SETTINGS | {"disc_channels": 8})).fit(example_root, checkpoint_dir=checkpoints, resume=True)


def test_bad_settings_are_clear_errors(example_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DefectscopeError, match="divisible by 32"):
        DRAEM(image_size=48)
    with pytest.raises(DefectscopeError, match="anomaly_probability"):
        DRAEM(anomaly_probability=1.5)
    with pytest.raises(DefectscopeError, match="not fitted"):
        DRAEM().reconstruct(torch.rand(1, 3, 128, 128))
    with pytest.raises(DefectscopeError, match="texture folder not found"):
        DRAEM(texture_dir=str(tmp_path / "missing"), **SETTINGS).fit(example_root)
