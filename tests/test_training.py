"""The shared training loop: determinism, checkpoints, resume, budgets and clear errors."""

from pathlib import Path

import pytest
import torch

from defectscope.checkpoint import CHECKPOINT_JSON, CHECKPOINT_TENSORS, load_checkpoint
from defectscope.data import ImageDataset, mvtec_samples
from defectscope.errors import DefectscopeError, ModelFileError
from defectscope.training import CachedImages, Trainer, cosine_schedule, shuffled_batches


@pytest.fixture(scope="module")
def images(example_root: Path) -> CachedImages:
    return CachedImages(ImageDataset(mvtec_samples(example_root, "train")[:12], 32), desc=None)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Conv2d(8, 3, 3, padding=1),
    )


def _train(images: CachedImages, net: torch.nn.Module, epochs: int, **kwargs) -> Trainer:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    trainer = Trainer(
        {"net": net},
        optimizer,
        epochs=epochs,
        seed=3,
        checkpoint_every=0.0,
        lr_schedule=cosine_schedule(epochs, warmup=1),
        **kwargs,
    )

    def step(batch: dict) -> dict:
        x = batch["image"]
        noisy = x + 0.1 * torch.randn_like(x)  # uses the epoch-seeded torch generator
        loss = torch.nn.functional.mse_loss(net(noisy), x)
        return {"loss": loss, "mse": loss}

    trainer.log = trainer.run(lambda epoch: shuffled_batches(images, 4, seed=3, epoch=epoch), step)
    return trainer


def _weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_training_reduces_loss_and_is_deterministic(images: CachedImages) -> None:
    a, b = _net(), _net()
    log = _train(images, a, 5).log
    _train(images, b, 5)
    assert log.epochs_done == 5 and log.stopped_by == "epochs"
    assert log.epoch_losses[-1] < log.epoch_losses[0]
    for key, value in _weights(a).items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_interrupted_run_resumes_to_the_same_weights(images: CachedImages, tmp_path: Path, monkeypatch) -> None:
    reference = _net()
    _train(images, reference, 4)

    calls = {"n": 0}
    real_step = Trainer._step

    def crashing_step(self, step, batch, epoch):
        calls["n"] += 1
        if epoch == 2 and calls["n"] > 7:  # killed in the middle of the third epoch
            raise KeyboardInterrupt
        return real_step(self, step, batch, epoch)

    monkeypatch.setattr(Trainer, "_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        _train(images, _net(), 4, checkpoint_dir=tmp_path)
    monkeypatch.setattr(Trainer, "_step", real_step)
    _tensors, meta = load_checkpoint(tmp_path)
    assert meta["epoch"] == 2  # the last complete epoch is kept and readable

    resumed = _net()
    log = _train(images, resumed, 4, checkpoint_dir=tmp_path, resume=True).log
    assert log.resumed_from_epoch == 2 and log.epochs_done == 4 and len(log.epoch_losses) == 4
    for key, value in _weights(reference).items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key


def test_existing_checkpoint_is_never_overwritten_without_resume(images: CachedImages, tmp_path: Path) -> None:
    _train(images, _net(), 1, checkpoint_dir=tmp_path)
    before = (tmp_path / CHECKPOINT_TENSORS).read_bytes()
    with pytest.raises(DefectscopeError, match="--resume"):
        _train(images, _net(), 1, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_TENSORS).read_bytes() == before


def test_resume_refuses_other_settings_and_damaged_files(images: CachedImages, tmp_path: Path) -> None:
    _train(images, _net(), 1, checkpoint_dir=tmp_path, identity={"lr": 1})
    with pytest.raises(DefectscopeError, match="other settings"):
        _train(images, _net(), 2, checkpoint_dir=tmp_path, resume=True, identity={"lr": 2})
    (tmp_path / CHECKPOINT_TENSORS).write_bytes(b"broken")
    with pytest.raises(ModelFileError, match="does not match"):
        _train(images, _net(), 2, checkpoint_dir=tmp_path, resume=True, identity={"lr": 1})
    (tmp_path / CHECKPOINT_JSON).write_text("{")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_time_budget_stops_and_checkpoints(images: CachedImages, tmp_path: Path) -> None:
    log = _train(images, _net(), 10_000, checkpoint_dir=tmp_path, time_budget=0.3).log
    assert log.stopped_by == "time budget" and log.epochs_done < 10_000 and log.seconds >= 0.3
    assert load_checkpoint(tmp_path)[1]["epoch"] == log.epochs_done


def test_divergence_is_a_clear_error(images: CachedImages) -> None:
    net = _net()
    trainer = Trainer({"net": net}, torch.optim.SGD(net.parameters(), lr=0.1), epochs=1)
    with pytest.raises(DefectscopeError, match="diverged"):
        trainer.run(
            lambda e: shuffled_batches(images, 4, seed=0, epoch=e),
            lambda batch: net(batch["image"]).sum() * float("nan"),
        )


def test_shuffled_batches_are_seeded_per_epoch(images: CachedImages) -> None:
    paths = lambda e: [p for b in shuffled_batches(images, 5, seed=1, epoch=e) for p in b["path"]]  # noqa: E731
    assert paths(0) == paths(0) and paths(0) != paths(1)
    assert len(paths(0)) == 12 and len(shuffled_batches(images, 5, seed=1, epoch=0)) == 3
    assert len(shuffled_batches(images, 11, seed=1, epoch=0)) == 1  # a last batch of 1 is dropped
