"""DMAD: unsupervised, semi-supervised (labelled defects) and unified fits, save/load, leave-one-out matching."""

import dataclasses
from pathlib import Path

import pytest
import torch

from defectscope import PatchCore
from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
from defectscope.errors import DefectscopeError
from defectscope.evaluate import evaluate
from defectscope.methods.base import split_calibration
from defectscope.methods.dmad import DMAD, knowledge
from defectscope.nn.grouped_knn import nearest_excluding_groups
from helpers import DMAD_SMALL


@pytest.fixture(scope="module")
def split(example_root: Path) -> tuple[list, list]:
    """Two labelled defects (one per defect type) and the test samples left to assert on."""
    test = mvtec_samples(example_root, "test")
    labelled = [next(s for s in test if s.defect_type == t) for t in ("broken_large", "contamination")]
    return labelled, [s for s in test if s not in labelled]


@pytest.fixture(scope="module")
def unsupervised(example_root: Path) -> DMAD:
    return DMAD(**DMAD_SMALL).fit(example_root)


def test_unsupervised_fit_fills_both_banks_and_scores(unsupervised: DMAD, split: tuple[list, list]) -> None:
    det = unsupervised
    info = det.fit_info
    assert info["normal_bank_size"] == det.normal_bank.shape[0] > 0
    assert info["anomaly_bank_size"] == det.anomaly_bank.shape[0] > 0 and info["anomaly_bank_labelled"] == 0
    assert info["training"]["epochs_done"] == 3
    metrics = evaluate(det, split[1]).metrics
    assert metrics["image_auroc"] >= 0.95 and metrics["pixel_auroc"] >= 0.93


def test_labelled_defects_grow_the_anomaly_bank(
    unsupervised: DMAD, split: tuple[list, list], example_root: Path
) -> None:
    labelled, rest = split
    det = DMAD(**DMAD_SMALL).fit(example_root, defects=labelled)
    info = det.fit_info
    assert info["labelled_defects"] == [str(s.path) for s in labelled]
    assert info["anomaly_bank_labelled"] > 0 and info["training_patches"]["labelled_anomalous"] > 0
    assert info["anomaly_bank_size"] == unsupervised.fit_info["anomaly_bank_size"] + info["anomaly_bank_labelled"]
    pred = det.predict(next(iterate_batches(ImageDataset(rest[:3], 64), 3)))
    assert pred.scores.shape == (3,) and torch.isfinite(pred.maps).all()
    # the two defects teach it what these defect types look like: better localisation on the others
    # (measured: pixel AP 0.52 against 0.44 without them)
    assert evaluate(det, rest).metrics["pixel_ap"] > evaluate(unsupervised, rest).metrics["pixel_ap"] + 0.03


def test_methods_without_defect_learning_hold_the_defects_out(example_root: Path, split: tuple[list, list]) -> None:
    det = PatchCore(image_size=64, backbone="mobilenet_v2").fit(example_root, defects=split[0])
    scores = det.predict(next(iterate_batches(ImageDataset(split[0], 64), len(split[0])))).scores
    cal = det.calibration
    assert cal is not None and cal.defect_scores == pytest.approx(sorted(scores.double().tolist()), rel=1e-6)
    miss = cal.miss_estimate
    assert miss is not None and miss.n == len(split[0]) and miss.count == int((scores <= cal.threshold).sum())


def test_dmad_cannot_set_a_recall_threshold_from_what_it_learns(example_root: Path, split: tuple[list, list]) -> None:
    with pytest.raises(DefectscopeError, match="cannot also set its threshold.*defectscope calibrate"):
        DMAD(**DMAD_SMALL, threshold_rule="recall", target_recall=0.5).fit(example_root, defects=split[0])


def test_unified_fit_over_two_categories(example_root: Path, split: tuple[list, list]) -> None:
    train = mvtec_samples(example_root, "train")
    mixed = [dataclasses.replace(s, category="x") if i % 2 else s for i, s in enumerate(train)]
    det = DMAD(**DMAD_SMALL).fit(mixed)
    assert det.fit_info["categories"] == ["bottle_small", "x"]
    # each category gets the coreset it would get on its own (10 % of its 8 x 8 patches per image)
    fit_part, _ = split_calibration(mixed, det.calibration_fraction, det.seed)
    per_category = [sum(s.category == c for s in fit_part) for c in ("bottle_small", "x")]
    assert det.fit_info["normal_bank_size"] == sum(round(n * 64 * det.coreset_ratio) for n in per_category)
    pred = det.predict(next(iterate_batches(ImageDataset(split[1][:2], 64), 2)))
    assert pred.scores.shape == (2,) and torch.isfinite(pred.scores).all()


def test_training_matches_skip_the_query_own_group() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(12, 5, generator=gen)
    groups = torch.arange(12) // 3  # four "images" of three patches
    queries = bank[[0, 4, 11]]
    own = groups[[0, 4, 11]]
    dist, index = nearest_excluding_groups(queries, bank, 2, own, groups)
    assert (dist > 0).all() and (groups[index] != own[:, None]).all()
    plain, _ = nearest_excluding_groups(queries, bank, 1)
    assert torch.allclose(plain, torch.zeros(3, 1), atol=1e-3)  # without groups each finds itself

    # the leave-one-out representation of a bank patch is the one it gets from a bank without its image
    anomaly = torch.randn(6, 5, generator=gen)
    anomaly_groups = torch.tensor([0, 0, 1, 2, 3, 3])
    query, group = bank[4:5], torch.tensor([1])
    loo = knowledge(
        query,
        bank,
        nearest_excluding_groups(query, bank, 2, group, groups),
        anomaly,
        nearest_excluding_groups(query, anomaly, 2, group, anomaly_groups),
        1.5,
    )
    others, others_a = bank[groups != 1], anomaly[anomaly_groups != 1]
    held_out = knowledge(
        query,
        others,
        nearest_excluding_groups(query, others, 2),
        others_a,
        nearest_excluding_groups(query, others_a, 2),
        1.5,
    )
    assert loo.shape == (1, 3 * 5 + 2 * 2) and torch.allclose(loo, held_out, atol=1e-5)
    with pytest.raises(ValueError, match="fewer than 3"):
        nearest_excluding_groups(query, anomaly[:3], 3, group, anomaly_groups[:3])
