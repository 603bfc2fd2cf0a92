"""FYD on real images: the affine maps mean what they say, the image-level transformer undoes known
moves of held-out good bottles, defects score higher than good images, and the model round-trips."""

from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope import load
from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
from defectscope.errors import DefectscopeError
from defectscope.evaluate import evaluate
from defectscope.methods import FYD, PaDiM
from defectscope.methods.fyd.alignment import affine, compose, invert, pose, warp

SIZE = 128
#: Corners and centre of the image as homogeneous normalised coordinates (3, 5).
POINTS = torch.tensor([[-1, -1, 1], [1, -1, 1], [-1, 1, 1], [1, 1, 1], [0, 0, 1.0]]).T


@pytest.fixture(scope="module")
def fitted(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FYD, Path]:
    # min_gain 0: on these 27 small images the image level lowers the held-out likelihood by 5 % only
    det = FYD(image_size=SIZE, epochs=250, fine_epochs=2, min_gain=0.0, time_budget=None).fit(example_root)
    return det, det.save(tmp_path_factory.mktemp("run") / "fyd")


@pytest.fixture(scope="module")
def good_test_images(example_root: Path) -> torch.Tensor:
    samples = [s for s in mvtec_samples(example_root, "test") if s.label == 0]
    return next(iterate_batches(ImageDataset(samples, SIZE), len(samples)))["image"]


def displacement_px(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 5) distance in pixels between where maps ``a`` and ``b`` send the corners and the centre."""
    return ((a - b) @ POINTS).norm(dim=1) * SIZE / 2


def test_affine_maps_compose_invert_and_warp_as_documented() -> None:
    theta = affine(torch.tensor([[0.3, 0.1, 0.2, -0.1], [-0.2, -0.05, 0.0, 0.3]]))
    torch.testing.assert_close(pose(theta), torch.tensor([[0.3, 0.1, 0.2, -0.1], [-0.2, -0.05, 0.0, 0.3]]))
    eye = torch.eye(2, 3).expand(2, 2, 3)
    torch.testing.assert_close(compose(theta, invert(theta)), eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(compose(invert(theta), theta), eye, atol=1e-6, rtol=0)
    # A shift of 2 k / W in normalised units samples k pixels to the right: warp(x)[j] = x[j + k].
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    shifted = warp(x, affine(torch.tensor([[0.0, 0.0, 2 * 3 / 8, 0.0]] * 2)))
    torch.testing.assert_close(shifted[..., :5], x[..., 3:])
    # Warping by a map, then by its inverse, gives back the interior of the image.
    back = warp(warp(x, theta), invert(theta))
    torch.testing.assert_close(back[..., 3:5, 3:5], x[..., 3:5, 3:5], atol=1e-3, rtol=0)


def test_image_alignment_brings_a_shifted_bottle_back(fitted: tuple[FYD, Path], good_test_images: torch.Tensor) -> None:
    """Held-out good bottles moved by (10, -8) px, or scaled by 8 %: composing the known move with the
    transform the network predicts for the moved image lands within a few pixels of its transform of the
    unmoved image (the bottle is nearly round, so its rotation is not observable and not asserted here)."""
    det, _ = fitted
    x = good_test_images
    with torch.no_grad():
        _, reference = det.image_aligner(x)
        # (move, largest mean and largest single displacement left, in pixels): a shift of 13 px on
        # average, a scale change of 5.6 px on average (7 px at the corners)
        for params, mean_left, max_left in (([0.0, 0.0, 0.16, -0.125], 2.0, 3.0), ([0.0, 0.08, 0.0, 0.0], 3.5, 5.0)):
            move = affine(torch.tensor([params] * len(x)))
            _, recovered = det.image_aligner(warp(x, move, "reflection"))
            before = displacement_px(move, reference)
            after = displacement_px(compose(move, recovered), reference)
            assert before.mean() > 5.0
            assert after.mean() < mean_left and after.max() < max_left, (params, after)
    assert (reference - torch.eye(2, 3)).abs().max() < 0.05  # the aligned example stays close to the identity


def test_aligned_images_of_a_moved_bottle_match_the_unmoved_ones(
    fitted: tuple[FYD, Path], good_test_images: torch.Tensor
) -> None:
    """Shift, rotation and scale together: after alignment the moved bottle differs from the aligned
    unmoved one by less than half of what it differed before (centre crop, mean absolute pixel error)."""
    det, _ = fitted
    x = good_test_images
    move = affine(torch.tensor([[0.2, 0.06, -0.12, 0.1]] * len(x)))
    moved = warp(x, move, "reflection")
    crop = slice(SIZE // 4, 3 * SIZE // 4)
    with torch.no_grad():
        reference, _ = det.image_aligner(x)
        realigned, _ = det.image_aligner(moved)
    before = (moved - x)[..., crop, crop].abs().mean()
    after = (realigned - reference)[..., crop, crop].abs().mean()
    assert after < 0.5 * before, (before, after)


def test_defects_score_higher_than_good_images(fitted: tuple[FYD, Path], example_root: Path) -> None:
    det, _ = fitted
    result = evaluate(det, mvtec_samples(example_root, "test"))
    assert result.metrics["image_auroc"] >= 0.95
    assert result.metrics["pixel_auroc"] >= 0.95
    scores = np.array([r.score for r in result.records])
    np.testing.assert_allclose(scores, [r.max_pixel_score for r in result.records], rtol=1e-6)
    alignment = det.fit_info["alignment"]
    assert det.fit_info["training"]["epochs_done"] == 250 and alignment["fine_epochs_done"] == 2
    # Held out, the aligned bottles' features are more likely than the unaligned ones: alignment is kept.
    assert alignment["kept"] == "both" and alignment["held_out_nll"]["none"] > alignment["held_out_nll"]["image"]
    assert det.fit_notes()[0].startswith("alignment kept: held-out negative log-likelihood")


def test_save_load_gives_identical_scores_and_maps(fitted: tuple[FYD, Path], example_root: Path) -> None:
    det, run = fitted
    again = load(run)
    assert isinstance(again, FYD) and again.get_params() == det.get_params()
    samples = mvtec_samples(example_root, "test")
    images = next(iterate_batches(ImageDataset(samples, SIZE), len(samples)))["image"]
    a, b = det.predict(images), again.predict(images)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again.image_aligner.template, det.image_aligner.template)


def test_without_room_to_move_fyd_is_padim(example_root: Path) -> None:
    """Zero ranges make every transformer the identity: the whole staged, warped path then gives PaDiM's scores."""
    train = mvtec_samples(example_root, "train")[:10]
    common = {"image_size": 64, "calibration_fraction": 0.0}
    still = FYD(**common, max_rotation=0.0, max_scale=0.0, max_shift=0.0, epochs=1, fine_epochs=1, batch_size=4)
    still.fit(train)
    padim = PaDiM(**common).fit(train)
    images = next(iterate_batches(ImageDataset(mvtec_samples(example_root, "test"), 64), 17))["image"]
    a, b = still.predict(images), padim.predict(images)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-4, atol=1e-3)


def test_alignment_without_a_clear_gain_is_switched_off(example_root: Path) -> None:
    train = mvtec_samples(example_root, "train")[:12]
    det = FYD(image_size=64, epochs=2, fine_epochs=1, batch_size=4, min_gain=1.0).fit(train)
    nll = det.fit_info["alignment"]["held_out_nll"]
    assert det.fit_info["alignment"]["kept"] == "none" and set(nll) == {"none", "image"}
    (note,) = det.fit_notes()
    assert note.startswith("alignment switched off, FYD scores as PaDiM does") and f"{nll['none']:.1f}" in note
    images = next(iterate_batches(ImageDataset(train[:3], 64), 3))["image"]
    _, theta = det.align(images)
    assert torch.equal(theta, torch.eye(2, 3).expand(3, 2, 3))


def test_bad_parameters_are_clear_errors() -> None:
    for params, match in [
        ({"align_size": 40}, "align_size must be a multiple of 16"),
        ({"max_rotation": 120.0}, "max_rotation must be in"),
        ({"max_shift": 0.7}, "max_shift must be in"),
        ({"feature_range": 2.0}, "feature_range must be in"),
        ({"max_train_images": 1}, "max_train_images must be at least 2"),
        ({"fine_epochs": -1}, "fine_epochs must be at least 0"),
        ({"min_gain": 1.5}, "min_gain must be in"),
    ]:
        with pytest.raises(DefectscopeError, match=match):
            FYD(**params)


def test_both_training_stages_checkpoint_and_resume_to_the_same_model(example_root: Path, tmp_path: Path) -> None:
    train = mvtec_samples(example_root, "train")[:10]
    params = {"image_size": 64, "epochs": 3, "fine_epochs": 2, "batch_size": 4, "proj_dim": 16}
    first = FYD(**params).fit(train, checkpoint_dir=tmp_path)
    assert (tmp_path / "fine_alignment").is_dir()
    resumed = FYD(**params).fit(train, checkpoint_dir=tmp_path, resume=True)
    assert resumed.fit_info["training"]["resumed_from_epoch"] == 3
    images = next(iterate_batches(ImageDataset(train[:4], 64), 4))["image"]
    torch.testing.assert_close(resumed.predict(images).scores, first.predict(images).scores)
