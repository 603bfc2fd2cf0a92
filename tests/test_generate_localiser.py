"""The localiser protocol: the split, the pooled image score, a briefly trained localiser and its metrics."""

from pathlib import Path

import pytest
import torch

from defectscope.data import ImageDataset, Sample, iterate_batches
from defectscope.data.sources import labelled_samples
from defectscope.errors import DataError, DefectscopeError
from defectscope.generate.localiser import (
    METRIC_KEYS,
    Localiser,
    LocaliserSettings,
    evaluate_localiser,
    pooled_image_score,
    train_localiser,
)
from defectscope.generate.localiser_data import folder_pairs, learning_folder, localiser_split
from defectscope.metrics import auroc
from defectscope.runs.synthesis import synth_run

SIZE = 64


@pytest.fixture(scope="module")
def perlin_dir(bottle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 Perlin-texture pairs on bottle good images at 64 px: 40 to train on, 8 held out."""
    out = tmp_path_factory.mktemp("perlin")
    synth_run(bottle_root, "perlin", 48, out, image_size=SIZE, seed=0)
    return out


@pytest.fixture(scope="module")
def trained(bottle_root: Path, perlin_dir: Path) -> tuple[Localiser, LocaliserSettings]:
    """A localiser trained for 100 steps on 16 good images and the first 40 Perlin pairs."""
    settings = LocaliserSettings(image_size=SIZE, steps=100, lr=3e-3, anomaly_share=0.8, score_window=7)
    good = [s.path for s in localiser_split(bottle_root).good[:16]]
    return train_localiser(good, folder_pairs(perlin_dir)[:40], settings), settings


def test_split_learns_the_first_third_per_type_and_never_evaluates_it(bottle_root: Path) -> None:
    split = localiser_split(bottle_root)
    types = ["broken_large", "broken_small", "contamination"]
    assert {name: len(e) for name, e in split.learn.items()} == dict(zip(types, [6, 7, 7]))
    assert split.n_learn == 20 and len(split.good) == 209
    learnt = {e.image for examples in split.learn.values() for e in examples}
    evaluated = {s.path for s in split.evaluation}
    assert not learnt & evaluated
    everything = labelled_samples(bottle_root)
    assert evaluated | learnt == {s.path for s in everything}  # nothing else is left out
    assert sum(s.label == 0 for s in split.evaluation) == 20 and sum(s.label for s in split.evaluation) == 43
    for examples in split.learn.values():  # the first third by file name
        names = sorted(s.path.name for s in everything if s.defect_type == examples[0].defect_type)
        assert [e.image.name for e in examples] == names[: len(examples)]


def test_learning_folder_holds_only_the_learning_defects(bottle_root: Path, tmp_path: Path) -> None:
    split = localiser_split(bottle_root)
    types = sorted(split.learn)
    folder = learning_folder(split, tmp_path)
    pairs = folder_pairs(folder)
    assert len(pairs) == split.n_learn
    assert {image.resolve() for image, _ in pairs} == {e.image.resolve() for v in split.learn.values() for e in v}
    assert all(mask.name == image.stem + "_mask.png" for image, mask in pairs)
    with pytest.raises(DataError, match="exists already"):
        learning_folder(split, tmp_path)
    chosen = folder_pairs(folder, 4)  # round-robin over the sorted types
    assert [image.parent.name for image, _ in chosen] == [*types, types[0]]
    with pytest.raises(DataError, match="fewer than the 21"):
        folder_pairs(folder, 21)


def test_pooled_image_score_is_the_largest_local_mean() -> None:
    maps = torch.zeros(4, 64, 64)
    maps[0, 10:31, 20:41] = 1.0  # a 21 x 21 block fills one window
    maps[1, 5, 5] = 1.0  # one hot pixel
    maps[2, 0:10, 54:64] = 0.5  # a 10 x 10 block in a corner
    maps[3] = 0.25
    scores = pooled_image_score(maps)
    expected = torch.tensor([1.0, 1 / 441, 0.5 * 100 / 441, 0.25])
    assert torch.allclose(scores, expected, atol=1e-6)
    assert torch.allclose(pooled_image_score(maps, size=1), maps.flatten(1).amax(1))
    small = torch.arange(100.0).view(1, 10, 10)  # smaller than the window: the mean of the whole map
    assert pooled_image_score(small).item() == pytest.approx(49.5)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        pooled_image_score(maps[0])


def test_settings_are_checked() -> None:
    with pytest.raises(DefectscopeError, match="multiple of 32"):
        LocaliserSettings(image_size=100)
    with pytest.raises(DefectscopeError, match="anomaly_share"):
        LocaliserSettings(anomaly_share=1.0)


def test_a_briefly_trained_localiser_finds_held_out_synthetic_defects(
    trained: tuple[Localiser, LocaliserSettings], perlin_dir: Path
) -> None:
    model, settings = trained
    assert model.training_log is not None and model.training_log.stopped_by == "epochs"
    held_out = [Sample(image, 1, "perlin", mask, "bottle") for image, mask in folder_pairs(perlin_dir)[40:]]
    batch = next(iterate_batches(ImageDataset(held_out, settings.image_size), len(held_out)))
    images, masks = batch["image"], batch["mask"]
    with torch.no_grad():
        maps = model(images).softmax(1)[:, 1]
    assert masks.any() and not masks.all()
    torch.manual_seed(0)
    untrained = Localiser(settings.width).eval()
    with torch.no_grad():
        chance = auroc(masks.flatten().numpy(), untrained(images).softmax(1)[:, 1].flatten().numpy())
    found = auroc(masks.flatten().numpy(), maps.flatten().numpy())
    assert found > 0.75 and found > chance + 0.2, (found, chance)  # measured: 0.84 to 0.89 over seeds 0 to 2


def test_evaluation_returns_every_metric_in_range(
    trained: tuple[Localiser, LocaliserSettings], perlin_dir: Path, bottle_root: Path
) -> None:
    model, settings = trained
    good = [s for s in localiser_split(bottle_root).evaluation if s.label == 0][:4]
    defects = [Sample(image, 1, "perlin", mask, "bottle") for image, mask in folder_pairs(perlin_dir)[40:]]
    metrics = evaluate_localiser(model, good + defects, settings)
    assert set(metrics) == set(METRIC_KEYS)
    assert all(0.0 <= value <= 1.0 for value in metrics.values()), metrics
    assert metrics["pixel_auroc"] > 0.75
    with pytest.raises(DefectscopeError, match="good and defective"):
        evaluate_localiser(model, good, settings)
