"""The distillation family (Uninformed Students, MKD, reverse distillation) on the bundled example.

Tiny settings (64 px, 2 epochs) keep this file fast on two CPU cores; the bottle-scale numbers
are measured with the CLI, not asserted here.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope import load
from defectscope.checkpoint import load_checkpoint
from defectscope.cli import main
from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
from defectscope.errors import DefectscopeError
from defectscope.methods import METHODS
from defectscope.methods.mkd import grey_opening
from defectscope.methods.trained import TrainedDetector
from defectscope.nn.distillation import (
    RunningMoments,
    cosine_distance,
    discrepancy_map,
    squared_distance,
)
from defectscope.training import Trainer

SIZE = 64
# Small networks and batches of 8 (4 steps per epoch on the 27 fitting images of the example).
SETTINGS = {
    "students": {"n_students": 2, "width": 32},
    "mkd": {"width": 32},
    "reverse_distillation": {"embed_dim": 64},
}
COMMON = {"image_size": SIZE, "epochs": 2, "batch_size": 8}
REAL_STEP = Trainer._step


def _make(name: str, **extra) -> TrainedDetector:
    return METHODS[name](**COMMON, **SETTINGS[name], **extra)


@pytest.fixture(scope="module")
def test_images(example_root: Path) -> dict:
    return next(iterate_batches(ImageDataset(mvtec_samples(example_root, "test"), SIZE), 64))


@pytest.fixture(scope="module")
def fitted(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TrainedDetector, Path]]:
    models = {}
    for name in SETTINGS:
        det = _make(name).fit(example_root)
        models[name] = (det, det.save(tmp_path_factory.mktemp(name) / "run"))
    return models


@pytest.fixture
def frequent_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint after every epoch (the default waits 30 s between checkpoints)."""
    real_init = Trainer.__init__

    def init(self, *args, **kwargs) -> None:
        kwargs["checkpoint_every"] = 0.0
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", init)


def _crash_in_second_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def crashing_step(self, step, batch, epoch):
        calls["n"] += 1
        if epoch == 1 and calls["n"] > 5:  # the second step of the second epoch
            raise KeyboardInterrupt
        return REAL_STEP(self, step, batch, epoch)

    monkeypatch.setattr(Trainer, "_step", crashing_step)


# -- shared pieces ----------------------------------------------------------------------------------
def test_feature_distances_and_discrepancy_map() -> None:
    a = torch.randn(2, 5, 4, 4)
    assert torch.allclose(cosine_distance(a, 3 * a), torch.zeros(2, 4, 4), atol=1e-6)
    assert torch.allclose(cosine_distance(a, -a), torch.full((2, 4, 4), 2.0), atol=1e-6)
    assert torch.allclose(squared_distance(a, a + 2), torch.full((2, 4, 4), 4.0))
    coarse = torch.randn(2, 5, 2, 2)
    total = discrepancy_map([a, coarse], [a, -coarse], (8, 8))
    assert total.shape == (2, 8, 8) and torch.allclose(total, torch.full((2, 8, 8), 2.0), atol=1e-5)


def test_running_moments_match_torch() -> None:
    x = torch.randn(10, 3, 5, 5) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 100
    m = RunningMoments()
    for part in x.split([3, 7]):
        m.update(part)
    flat = x.transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(m.mean().double(), flat.mean(1), rtol=1e-6)
    assert torch.allclose(m.std().double(), flat.std(1), rtol=1e-4)


def test_grey_opening_removes_small_peaks_and_keeps_blobs() -> None:
    maps = torch.zeros(1, 20, 20)
    maps[0, 3, 3] = 5.0  # isolated single-pixel peak
    maps[0, 10:16, 10:16] = 2.0  # a 6 x 6 region
    opened = grey_opening(maps, 5)
    assert opened[0, 3, 3] == 0 and torch.equal(opened[0, 10:16, 10:16], maps[0, 10:16, 10:16])
    assert torch.equal(grey_opening(maps, 1), maps)


# -- every method -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_training_runs_all_epochs(name: str, fitted: dict) -> None:
    training = fitted[name][0].fit_info["training"]
    assert training["epochs_done"] == 2 and training["stopped_by"] == "epochs" and training["seconds"] > 0


@pytest.mark.parametrize("name", list(SETTINGS))
def test_training_loss_falls(name: str, fitted: dict) -> None:
    losses = fitted[name][0].training_log.epoch_losses
    assert len(losses) == 2 and losses[1] < losses[0]


def test_mkd_gradient_localisation(fitted: dict, test_images: dict) -> None:
    det, run = fitted["mkd"]
    images = test_images["image"][:3]
    discrepancy = det.predict(images)
    gradient = load(run)
    gradient.localization = "gradient"
    pred = gradient.predict(images)
    assert pred.maps.shape == (3, SIZE, SIZE) and torch.isfinite(pred.maps).all() and (pred.maps >= 0).all()
    assert torch.allclose(pred.scores, discrepancy.scores, rtol=1e-4)  # the score is the loss either way
    assert det.fit_info["lambda_dir"] > 0


def test_defects_score_higher_than_good_images(example_root: Path, test_images: dict) -> None:
    det = METHODS["reverse_distillation"](image_size=SIZE, epochs=4, batch_size=8, embed_dim=64).fit(example_root)
    scores = det.predict(test_images["image"]).scores.numpy()
    labels = test_images["label"].numpy().astype(bool)
    assert scores[labels].mean() > scores[~labels].mean()


def test_bad_parameters_are_clear_errors() -> None:
    with pytest.raises(DefectscopeError, match="localization"):
        METHODS["mkd"](localization="saliency")
    with pytest.raises(DefectscopeError, match="n_students"):
        METHODS["students"](n_students=1)
    with pytest.raises(DefectscopeError, match="finest first"):
        METHODS["reverse_distillation"](layers=("s16", "s8"))


# -- interrupted training resumes to the same model ---------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_killed_run_resumes_like_an_uninterrupted_one(
    name: str,
    fitted: dict,
    test_images: dict,
    example_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    frequent_checkpoints: None,
) -> None:
    reference, _ = fitted[name]
    _crash_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _make(name).fit(example_root, checkpoint_dir=tmp_path, resume=False)
    assert load_checkpoint(tmp_path)[1]["epoch"] == 1
    monkeypatch.setattr(Trainer, "_step", REAL_STEP)

    resumed = _make(name).fit(example_root, checkpoint_dir=tmp_path, resume=True)
    training = resumed.fit_info["training"]
    assert training["resumed_from_epoch"] == 1 and training["epochs_done"] == 2
    images = test_images["image"]
    np.testing.assert_allclose(
        resumed.predict(images).scores.numpy(), reference.predict(images).scores.numpy(), rtol=1e-4, atol=1e-5
    )


def test_cli_resume_continues_an_interrupted_fit(
    example_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frequent_checkpoints: None
) -> None:
    run = tmp_path / "run"
    args = [
        "fit",
        str(example_root),
        "--method",
        "reverse_distillation",
        "--epochs",
        "2",
        "--image-size",
        str(SIZE),
        "--batch-size",
        "8",
        "--set",
        "embed_dim=64",
        "--out",
        str(run),
    ]
    _crash_in_second_epoch(monkeypatch)
    assert main(args) == 130  # interrupted: the epoch-1 checkpoint stays
    monkeypatch.setattr(Trainer, "_step", REAL_STEP)
    assert main(args) == 2  # refuses to start over on top of the checkpoint
    assert main([*args, "--resume"]) == 0
    training = load(run).fit_info["training"]
    assert training["resumed_from_epoch"] == 1 and training["epochs_done"] == 2
