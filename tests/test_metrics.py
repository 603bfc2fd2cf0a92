"""Metrics checked against scikit-learn and a plain AUPRO reference, on random and real data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn import metrics as skm

from defectscope.metrics import (
    assess,
    aupro,
    auroc,
    average_precision,
    compute_metrics,
    compute_metrics_and_curves,
    f1_max,
    image_metrics,
    pixel_metrics,
    pr_curve,
    pro_curve,
    roc_curve,
)

SIZE = 64  # real-data masks and maps are resized to SIZE x SIZE


# --- references written plainly, independent of the implementation -------------------------


def reference_pro_points(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve by brute force: every distinct score, every region labelled image by image.

    ``masks`` and ``maps`` are stacks or lists of 2-D arrays of any sizes.
    """
    regions, normal = [], []
    for mask, amap in zip(masks, maps):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labelled == i] for i in range(1, n + 1)]
        normal.append(amap[~mask])
    normal = np.concatenate(normal)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([np.ravel(a) for a in maps]))[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(region >= t) for region in regions]))
    return np.array(fprs), np.array(pros)


def reference_aupro(masks, maps, limit: float = 0.3) -> float:
    return reference_area(*reference_pro_points(masks, maps), limit) / limit


def reference_area(fprs: np.ndarray, pros: np.ndarray, limit: float) -> float:
    """Trapezoids segment by segment, the last one cut at ``limit`` by linear interpolation."""
    area = 0.0
    for x0, y0, x1, y1 in zip(fprs[:-1], pros[:-1], fprs[1:], pros[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_cut = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_cut) / 2
            break
    return area


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    p, r = precision[:-1], recall[:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return float(f1.max())


# --- data -----------------------------------------------------------------------------------


def random_image_case(seed: int, n: int = 400, decimals: int | None = 1, dtype=np.float64):
    """Labels and overlapping scores; rounding creates many ties."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 1.2 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return labels.astype(int), scores.astype(dtype)


def random_pixel_case(seed: int, n: int = 6, size: int = 24, decimals: int | None = 1):
    """Masks with several blobs per image (first image good) and maps correlated with them."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 1.5, 1.5))
    masks = field > np.quantile(field, 0.85)
    masks[0] = False
    maps = rng.normal(size=masks.shape) * 0.6 + masks
    return masks, maps if decimals is None else np.round(maps, decimals)


def random_ragged_case(seed: int, n: int = 6, decimals: int | None = 1):
    """Like random_pixel_case, but every image has its own size: lists of 2-D masks and maps."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(n):
        shape = tuple(int(v) for v in rng.integers(14, 34, size=2))
        field = ndimage.gaussian_filter(rng.random(shape), sigma=1.5)
        mask = (field > np.quantile(field, 0.85)) & (i > 0)
        amap = rng.normal(size=shape) * 0.6 + mask
        masks.append(mask)
        maps.append(amap if decimals is None else np.round(amap, decimals))
    return masks, maps


def n_regions(masks) -> int:
    return sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        small = im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255


@pytest.fixture(scope="module")
def bottle_case(bottle_root: Path):
    """Real bottle test split: labels, masks, and maps = distance from the mean good image."""
    train = sorted((bottle_root / "train" / "good").glob("*.png"))[:20]
    mean_good = np.mean([load_rgb(p) for p in train], axis=0)
    labels, masks, maps = [], [], []
    for path in sorted((bottle_root / "test").glob("*/*.png")):
        defect = path.parent.name
        if defect == "good":
            mask = np.zeros((SIZE, SIZE), dtype=bool)
        else:
            with Image.open(bottle_root / "ground_truth" / defect / f"{path.stem}_mask.png") as im:
                mask = np.asarray(im.convert("L").resize((SIZE, SIZE), Image.NEAREST)) > 0
        distance = np.linalg.norm(load_rgb(path) - mean_good, axis=-1)
        labels.append(defect != "good")
        masks.append(mask)
        maps.append(ndimage.gaussian_filter(distance, sigma=1.0))
    maps = np.stack(maps).astype(np.float32)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    return np.array(labels), scores, np.stack(masks), maps


# --- ranking metrics against scikit-learn ---------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_ranking_metrics_match_sklearn(seed: int, decimals: int | None) -> None:
    labels, scores = random_image_case(seed, decimals=decimals)
    assert auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)

    fpr, tpr, thresholds = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-15)
    np.testing.assert_array_equal(thresholds, sk_thresholds)

    precision, recall, thresholds = pr_curve(labels, scores)
    sk_precision, sk_recall, sk_thresholds = skm.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, sk_precision, atol=1e-15)
    np.testing.assert_allclose(recall, sk_recall, atol=1e-15)
    np.testing.assert_array_equal(thresholds, sk_thresholds)


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_matches_sklearn_and_its_threshold_gives_it(seed: int) -> None:
    labels, scores = random_image_case(seed, decimals=1)
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)
    assert skm.f1_score(labels, scores >= threshold) == pytest.approx(best, abs=1e-12)


def test_bool_labels_and_float32_scores() -> None:
    labels, scores = random_image_case(7, decimals=None, dtype=np.float32)
    expected = skm.roc_auc_score(labels, scores)
    assert auroc(labels.astype(bool), scores) == pytest.approx(expected, abs=1e-12)
    assert average_precision(labels.astype(bool), scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-12
    )


def test_perfect_inverted_and_constant_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    perfect = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert auroc(labels, perfect) == 1.0
    assert average_precision(labels, perfect) == 1.0
    assert f1_max(labels, perfect) == (1.0, 0.7)

    inverted = -perfect
    assert auroc(labels, inverted) == 0.0
    assert average_precision(labels, inverted) == pytest.approx(
        skm.average_precision_score(labels, inverted), abs=1e-15
    )

    constant = np.full(5, 0.5)
    assert auroc(labels, constant) == 0.5
    assert average_precision(labels, constant) == pytest.approx(0.4)
    assert f1_max(labels, constant) == (pytest.approx(2 * 0.4 / 1.4), 0.5)


def test_image_metrics_keys_and_values() -> None:
    labels, scores = random_image_case(3)
    result = image_metrics(labels, scores)
    assert result == {
        "image_auroc": pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12),
        "image_ap": pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12),
        "image_f1_max": pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12),
    }


# --- AUPRO ----------------------------------------------------------------------------------


def test_aupro_perfect_and_inverted_maps() -> None:
    masks, _ = random_pixel_case(0)
    assert aupro(masks, masks.astype(float)) == 1.0
    assert aupro(masks, 1.0 - masks) == 0.0


def test_aupro_weights_regions_equally_by_hand() -> None:
    # Region A: 1 pixel at 0.9. Region B: 3 pixels at 0.9, 0.2, 0.2. 20 normal pixels, two at 0.5.
    masks = np.zeros((1, 4, 6), dtype=bool)
    maps = np.zeros((1, 4, 6))
    masks[0, 0, 0] = True
    maps[0, 0, 0] = 0.9
    masks[0, 3, 3:6] = True
    maps[0, 3, 3:6] = [0.9, 0.2, 0.2]
    maps[0, 1, 4:6] = 0.5
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 1])
    np.testing.assert_allclose(pro, [0, 2 / 3, 2 / 3, 1, 1])
    # 0.1 * 2/3 + 0.2 * 1 over 0.3
    assert aupro(masks, maps) == pytest.approx(8 / 9, abs=1e-12)


def test_aupro_point_exactly_at_the_limit() -> None:
    masks = np.zeros((1, 1, 11), dtype=bool)
    masks[0, 0, 0] = True
    maps = np.array([[[0.5] + [0.9] * 3 + [0.1] * 7]])
    assert aupro(masks, maps) == 0.0
    assert aupro(masks, maps, fpr_limit=0.5) == pytest.approx(0.4, abs=1e-12)


def test_regions_are_8_connected_and_per_image() -> None:
    masks = np.zeros((2, 4, 6), dtype=bool)
    maps = np.zeros((2, 4, 6))
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region of 2 pixels
    maps[0, 0, 0] = 1.0
    masks[0, 3, 5] = True  # a second region, missed
    masks[1, 0, 0:3] = True  # image 1: touches image 0's corner only across the stack
    _, pro = pro_curve(masks, maps)
    # Regions: {2 px, half detected}, {1 px, missed}, {3 px, missed}. With 4-connectivity it
    # would be 1/4, with regions joined across images 1/10.
    assert pro[1] == pytest.approx(0.5 / 3, abs=1e-15)


@pytest.mark.parametrize(("seed", "decimals"), [(0, 1), (1, 1), (2, 0), (3, None)])
def test_aupro_matches_reference_on_random_regions(seed: int, decimals: int | None) -> None:
    masks, maps = random_pixel_case(seed, size=16 if decimals is None else 24, decimals=decimals)
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    assert n_regions >= 2 * (len(masks) - 1)  # several regions per defective image
    fpr, pro = pro_curve(masks, maps)
    ref_fpr, ref_pro = reference_pro_points(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    for limit in (0.3, 0.05, 1.0):
        # aupro integrates a reduced curve; the full one from pro_curve must give the same area.
        expected = reference_area(ref_fpr, ref_pro, limit) / limit
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
        assert reference_area(fpr, pro, limit) / limit == pytest.approx(expected, abs=1e-9)


def test_aupro_of_uninformative_map_is_near_chance() -> None:
    rng = np.random.default_rng(0)
    masks = ndimage.gaussian_filter(rng.random((8, 64, 64)), sigma=(0, 3, 3)) > 0.53
    maps = rng.random(masks.shape).astype(np.float32)
    # PRO(t) ~ FPR(t), so the normalised area up to 0.3 is ~ 0.3 / 2.
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.01)


# --- pixel metrics and the full set ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(2))
def test_pixel_metrics_match_sklearn_and_reference(seed: int) -> None:
    masks, maps = random_pixel_case(seed)
    result = pixel_metrics(masks, maps)
    flat_labels, flat_scores = masks.ravel(), maps.ravel()
    assert result == {
        "pixel_auroc": pytest.approx(skm.roc_auc_score(flat_labels, flat_scores), abs=1e-12),
        "pixel_ap": pytest.approx(skm.average_precision_score(flat_labels, flat_scores), abs=1e-12),
        "pixel_f1_max": pytest.approx(sklearn_f1_max(flat_labels, flat_scores), abs=1e-12),
        "aupro": pytest.approx(reference_aupro(masks, maps), abs=1e-9),
    }


def test_pixel_metrics_without_anomalous_pixels_are_nan() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps = np.random.default_rng(0).random(masks.shape)
    with pytest.warns(RuntimeWarning, match="no anomalous pixel"):
        result = pixel_metrics(masks, maps)
    assert set(result) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}
    assert all(math.isnan(v) for v in result.values())


def test_real_bottle_image_and_pixel_metrics(bottle_case) -> None:
    labels, scores, masks, maps = bottle_case
    assert len(labels) == 83 and labels.sum() == 63
    result = compute_metrics(labels, scores, masks, maps)
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    assert result == {
        "image_auroc": pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12),
        "image_ap": pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12),
        "image_f1_max": pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12),
        "pixel_auroc": pytest.approx(skm.roc_auc_score(flat_masks, flat_maps), abs=1e-12),
        "pixel_ap": pytest.approx(skm.average_precision_score(flat_masks, flat_maps), abs=1e-12),
        "pixel_f1_max": pytest.approx(sklearn_f1_max(flat_masks, flat_maps), abs=1e-12),
        "aupro": result["aupro"],
    }
    # A crude detector: clearly informative, clearly imperfect.
    assert 0.6 < result["image_auroc"] < 0.999
    assert 0.6 < result["pixel_auroc"] < 0.999
    assert 0.2 < result["aupro"] < 0.95


def test_real_bottle_aupro_matches_reference(bottle_case) -> None:
    _, _, masks, maps = bottle_case
    quantised = np.floor(maps / maps.max() * 255)  # 256 levels: the reference sweeps them all
    assert aupro(masks, quantised) == pytest.approx(reference_aupro(masks, quantised), abs=1e-9)


def test_compute_metrics_without_pixels() -> None:
    labels, scores = random_image_case(1)
    assert compute_metrics(labels, scores) == image_metrics(labels, scores)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "no anomalous sample"),
        ([1, 1], [0.1, 0.2], "no normal sample"),
        ([], [], "empty"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
        ([0, 1, 1], [0.1, np.inf, 0.3], "infinite"),
        ([0, 1, 1], [0.1, 0.2], "length"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0/1"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 1], ["a", "b"], "real numbers"),
    ],
)
def test_bad_image_inputs_raise(labels, scores, match: str) -> None:
    for metric in (auroc, average_precision, f1_max, roc_curve, pr_curve, image_metrics):
        with pytest.raises(ValueError, match=match):
            metric(labels, scores)


def test_bad_pixel_inputs_raise() -> None:
    masks, maps = random_pixel_case(0)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_metrics(masks, maps[:, :-1])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pixel_metrics(masks[0], maps[0])
    with pytest.raises(ValueError, match="mask > 0"):
        pixel_metrics(masks.astype(np.uint8) * 255, maps)
    with pytest.raises(ValueError, match="empty"):
        pixel_metrics(masks[:0], maps[:0])
    bad = maps.copy()
    bad[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(masks, bad)
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, bad)
    with pytest.raises(ValueError, match="no anomalous pixel"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        pro_curve(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=1.5)


def test_bad_compute_metrics_inputs_raise() -> None:
    masks, maps = random_pixel_case(0)
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    with pytest.raises(ValueError, match="both masks and maps"):
        compute_metrics(labels, scores, masks=masks)
    with pytest.raises(ValueError, match="image labels"):
        compute_metrics(labels[:-1], scores[:-1], masks, maps)


# --- images of different sizes: lists of 2-D masks and maps ---------------------------------


def assert_same_results(a: tuple, b: tuple) -> None:
    """Exactly equal (metrics, curves[, notes]) from assess / compute_metrics_and_curves."""
    assert a[0] == b[0] and a[2:] == b[2:]
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        for x, y in zip(a[1][key], b[1][key]):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("seed", "decimals"), [(0, 1), (1, None), (2, 0)])
def test_lists_of_equal_shapes_give_exactly_the_stacked_results(seed: int, decimals: int | None) -> None:
    masks, maps = random_pixel_case(seed, decimals=decimals)
    maps = maps.astype(np.float32)
    assert n_regions(masks) >= 2 * (len(masks) - 1)  # several regions per defective image
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    as_objects = np.empty(len(maps), dtype=object)
    as_objects[:] = list(maps)
    for m, a in [(list(masks), list(maps)), (masks, list(maps)), (tuple(masks), maps), (masks, as_objects)]:
        assert pixel_metrics(m, a) == pixel_metrics(masks, maps)
        for x, y in zip(pro_curve(m, a), pro_curve(masks, maps)):
            np.testing.assert_array_equal(x, y)
        assert aupro(m, a, fpr_limit=0.05) == aupro(masks, maps, fpr_limit=0.05)
        assert compute_metrics(labels, scores, m, a) == compute_metrics(labels, scores, masks, maps)
        assert_same_results(
            compute_metrics_and_curves(labels, scores, m, a), compute_metrics_and_curves(labels, scores, masks, maps)
        )
        assert_same_results(assess(labels, scores, m, a), assess(labels, scores, masks, maps))


def test_ragged_pixel_metrics_by_hand() -> None:
    # Image 0 (2 x 3): region A, 1 pixel at 0.9; one of 5 normal pixels at 0.5.
    # Image 1 (4 x 2): region B, 3 pixels at 0.9, 0.2, 0.2; one of 5 normal pixels at 0.5.
    masks = [np.zeros((2, 3), bool), np.zeros((4, 2), bool)]
    maps = [np.zeros((2, 3)), np.zeros((4, 2))]
    masks[0][0, 0], maps[0][0, 0], maps[0][1, 2] = True, 0.9, 0.5
    masks[1][1:, 0], maps[1][1:, 0], maps[1][0, 1] = True, [0.9, 0.2, 0.2], 0.5
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0.2, 0.2, 1])
    np.testing.assert_allclose(pro, [0, 2 / 3, 2 / 3, 1, 1])
    assert aupro(masks, maps) == pytest.approx(7 / 9, abs=1e-12)  # (0.2 * 2/3 + 0.1 * 1) / 0.3
    # 40 (anomalous, normal) pairs: the two 0.9 beat all 10, the two 0.2 beat the 8 zeros.
    assert pixel_metrics(masks, maps)["pixel_auroc"] == pytest.approx(36 / 40, abs=1e-15)


@pytest.mark.parametrize(("seed", "decimals"), [(0, 1), (1, 0), (2, None)])
def test_ragged_pixel_metrics_match_pooled_pixels_and_reference(seed: int, decimals: int | None) -> None:
    masks, maps = random_ragged_case(seed, decimals=decimals)
    assert len({m.shape for m in masks}) == len(masks)
    assert n_regions(masks) >= 2 * (len(masks) - 1)
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([a.ravel() for a in maps])
    labels = np.array([m.any() for m in masks])
    scores = np.array([a.max() for a in maps])
    expected = {
        "pixel_auroc": pytest.approx(auroc(flat_masks, flat_maps), abs=1e-12),
        "pixel_ap": pytest.approx(skm.average_precision_score(flat_masks, flat_maps), abs=1e-12),
        "pixel_f1_max": pytest.approx(sklearn_f1_max(flat_masks, flat_maps), abs=1e-12),
        "aupro": pytest.approx(reference_aupro(masks, maps), abs=1e-9),
    }
    assert pixel_metrics(masks, maps) == expected
    assert compute_metrics(labels, scores, masks, maps) == {**image_metrics(labels, scores), **expected}
    metrics, curves, notes = assess(labels, scores, masks, maps, np.ones(len(masks), bool))
    assert metrics == {**image_metrics(labels, scores), **expected} and notes == [] and "pro" in curves
    ref_fpr, ref_pro = reference_pro_points(masks, maps)
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)


def test_ragged_float32_and_float64_maps_mix() -> None:
    masks, maps = random_ragged_case(3, decimals=None)
    mixed = [a.astype(np.float32) if i % 2 else a for i, a in enumerate(maps)]
    promoted = [a.astype(np.float64) for a in mixed]
    assert pixel_metrics(masks, mixed) == pixel_metrics(masks, promoted)


def test_assess_checks_ragged_inputs() -> None:
    masks, maps = random_ragged_case(4)
    labels = np.array([0, 1, 1, 1, 1, 1])
    scores = labels + np.linspace(0, 0.5, labels.size)
    names = list("abcdef")
    masks[2] = np.zeros_like(masks[2])
    metrics, _, notes = assess(labels, scores, masks, maps, names=names)
    assert len(notes) == 1 and notes[0].startswith("c: defect image with an empty ground-truth mask")
    assert metrics["pixel_auroc"] == pixel_metrics(masks, maps)["pixel_auroc"]
    maps[4] = maps[4].copy()
    maps[4][0, 0] = np.nan
    metrics, _, notes = assess(labels, scores, masks, maps, names=names)
    assert "pixel_auroc" not in metrics and "image_auroc" in metrics
    assert notes[1:] == [
        "pixel metrics skipped: 1 anomaly map(s) hold non-finite values",
        "e: anomaly map holds non-finite values",
    ]
    empty = [np.zeros_like(m) for m in masks]
    assert assess(labels, scores, empty, maps)[2][0].startswith(
        "pixel metrics skipped: the ground-truth masks of all 5"
    )
    has_mask = np.array([True] * 5 + [False])
    assert "image-level only" in assess(labels, scores, masks, maps, has_mask)[2][0]
    with pytest.raises(ValueError, match="6 image labels but 5 masks/maps"):
        assess(labels, scores, masks[:5], maps[:5])


def test_bad_ragged_inputs_raise() -> None:
    masks, maps = random_ragged_case(0)
    cases = [
        (masks, [*maps[:2], maps[2][:, :-1], *maps[3:]], r"mask and map of image 2 differ in shape"),
        (masks, maps[:-1], "6 masks but 5 maps"),
        ([], [], "empty"),
        ([*masks[:1], np.zeros((0, 4), bool)], [*maps[:1], np.zeros((0, 4))], "image 1 are empty"),
        ([masks[0][None]], [maps[0][None]], "image 0 must be 2-D"),
        ([m.astype(np.uint8) * 255 for m in masks], maps, r"masks\[1\] must be bool or 0/1.*mask > 0"),
        (masks, [*maps[:3], np.full(maps[3].shape, np.nan), *maps[4:]], "NaN"),
        (masks, 3.0, "sequences of 2-D arrays"),
    ]
    for m, a, match in cases:
        with pytest.raises(ValueError, match=match):
            pixel_metrics(m, a)
    labels = np.array([m.any() for m in masks])
    with pytest.raises(ValueError, match="image labels"):
        compute_metrics(labels[:-1], np.arange(5.0), masks, maps)
