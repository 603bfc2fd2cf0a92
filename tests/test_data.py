"""Tests for defectscope.data: layouts, robust image/mask IO, tensors, batches, real datasets."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from defectscope.data import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    Sample,
    find_categories,
    folder_samples,
    image_to_tensor,
    iterate_batches,
    load_image,
    load_mask,
    mask_to_tensor,
    mvtec_samples,
    read_image,
)
from helpers import raises_naming

# ---------------------------------------------------------------------------------------------
# helpers


def _save(path: Path, array: np.ndarray, mode: str | None = None, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **params)
    return path


def _rgb(size: int = 16, value: int = 128) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def _mask(size: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[4:8, 4:8] = 255
    return mask


def _category(
    root: Path, n_train: int = 2, defects: tuple[str, ...] = ("crack",), masks: bool = True, name: str = "widget"
) -> Path:
    """A tiny MVTec-layout category: n_train good, 1 good test image, 1 image per defect type."""
    cat = root / name
    for i in range(n_train):
        _save(cat / "train" / "good" / f"{i:03d}.png", _rgb())
    _save(cat / "test" / "good" / "000.png", _rgb())
    for defect in defects:
        _save(cat / "test" / defect / "000.png", _rgb(value=200))
        if masks:
            _save(cat / "ground_truth" / defect / "000_mask.png", _mask())
    return cat


def _noise_png_bytes(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# layouts


def test_image_extensions_are_lower_case_suffixes() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"} == IMAGE_EXTENSIONS


def test_mvtec_samples_lists_sorted_splits_with_masks(tmp_path: Path) -> None:
    cat = _category(tmp_path, n_train=3, defects=("scratch", "crack"))
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"\0junk")
    (cat / "test" / ".DS_Store").write_bytes(b"\0junk")
    train = mvtec_samples(cat, "train")
    assert [s.path.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in train)
    assert train[0].category == "widget" and train[0].path.is_absolute()
    test = mvtec_samples(cat, "test")
    assert [(s.defect_type, s.label) for s in test] == [("crack", 1), ("good", 0), ("scratch", 1)]
    assert test[0].mask_path == cat / "ground_truth" / "crack" / "000_mask.png"
    assert test[1].mask_path is None
    assert mvtec_samples(cat, "test") == test  # deterministic


def test_missing_category_dir(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "nope", "category folder not found"):
        mvtec_samples(tmp_path / "nope", "train")


def test_missing_train_good(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    for image in (cat / "train" / "good").iterdir():
        image.unlink()
    (cat / "train" / "good").rmdir()
    with raises_naming(cat / "train" / "good", "folder not found"):
        mvtec_samples(cat, "train")


def test_empty_train_good(tmp_path: Path) -> None:
    cat = _category(tmp_path, n_train=0)
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"x")
    with raises_naming(cat / "train" / "good", "no images"):
        mvtec_samples(cat, "train")


def test_missing_test_dir(tmp_path: Path) -> None:
    cat = tmp_path / "widget"
    _save(cat / "train" / "good" / "000.png", _rgb())
    with raises_naming(cat / "test", "folder not found"):
        mvtec_samples(cat, "test")


def test_bad_split_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        mvtec_samples(_category(tmp_path), "val")


def test_defect_without_mask_needs_image_level_only(tmp_path: Path) -> None:
    cat = _category(tmp_path, masks=False)
    image = cat / "test" / "crack" / "000.png"
    with raises_naming(image, "000_mask.png", "image_level_only", "--image-level-only"):
        mvtec_samples(cat, "test")
    samples = mvtec_samples(cat, "test", image_level_only=True)
    defect = next(s for s in samples if s.label == 1)
    assert defect.mask_path is None
    item = ImageDataset([defect], image_size=8)[0]
    assert item["has_mask"] is False and not item["mask"].any()
    good = ImageDataset([next(s for s in samples if s.label == 0)], image_size=8)[0]
    assert good["has_mask"] is True


def test_image_level_only_keeps_existing_masks(tmp_path: Path) -> None:
    cat = _category(tmp_path, defects=("crack", "dent"))
    (cat / "ground_truth" / "dent" / "000_mask.png").unlink()
    samples = {s.defect_type: s for s in mvtec_samples(cat, "test", image_level_only=True)}
    assert samples["crack"].mask_path is not None
    assert samples["dent"].mask_path is None


@pytest.mark.parametrize("folder", ["train/good", "test/crack"])
def test_non_image_file_in_image_folder(tmp_path: Path, folder: str) -> None:
    cat = _category(tmp_path)
    stray = cat / folder / "notes.txt"
    stray.write_text("not an image")
    split = folder.split("/")[0]
    with raises_naming(stray, "not an image file"):
        mvtec_samples(cat, split)


def test_stray_file_in_test_folder(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    stray = _save(cat / "test" / "loose.png", _rgb())
    with raises_naming(stray, "unexpected file"):
        mvtec_samples(cat, "test")


def test_folder_samples_matches_masks_by_stem(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        _save(tmp_path / "ok" / name, _rgb())
    for name in ("d1.png", "d2.jpg", "d3.png"):
        _save(tmp_path / "bad" / name, _rgb(value=10))
    _save(tmp_path / "masks" / "d1_mask.png", _mask())
    _save(tmp_path / "masks" / "d2.png", _mask())
    _save(tmp_path / "masks" / "d3.BMP", _mask(), format="BMP")
    samples = folder_samples(tmp_path / "ok", tmp_path / "bad", tmp_path / "masks", category="parts")
    assert [s.path.name for s in samples] == ["a.png", "b.png", "d1.png", "d2.jpg", "d3.png"]
    assert [s.label for s in samples] == [0, 0, 1, 1, 1]
    assert [s.mask_path.name for s in samples[2:]] == ["d1_mask.png", "d2.png", "d3.BMP"]
    assert {s.category for s in samples} == {"parts"} and samples[2].defect_type == "bad"
    assert len(folder_samples(tmp_path / "ok")) == 2


def test_folder_samples_missing_mask(tmp_path: Path) -> None:
    _save(tmp_path / "ok" / "a.png", _rgb())
    defect = _save(tmp_path / "bad" / "d1.png", _rgb())
    (tmp_path / "masks").mkdir()
    with raises_naming(defect, "image_level_only"):
        folder_samples(tmp_path / "ok", tmp_path / "bad", tmp_path / "masks")
    with raises_naming(defect, "no mask folder given"):
        folder_samples(tmp_path / "ok", tmp_path / "bad")
    assert folder_samples(tmp_path / "ok", tmp_path / "bad", image_level_only=True)[1].mask_path is None


def test_folder_samples_missing_dirs(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "ok", "folder not found"):
        folder_samples(tmp_path / "ok")
    _save(tmp_path / "ok" / "a.png", _rgb())
    with raises_naming(tmp_path / "bad", "not found"):
        folder_samples(tmp_path / "ok", tmp_path / "bad", image_level_only=True)


def test_find_categories(tmp_path: Path) -> None:
    first = _category(tmp_path, name="a")
    second = _category(tmp_path, name="b")
    (tmp_path / ".cache" / "train" / "good").mkdir(parents=True)
    (tmp_path / "README.md").write_text("datasets")
    (tmp_path / "notes").mkdir()
    assert find_categories(tmp_path) == [first, second]
    assert find_categories(first) == [first]
    with raises_naming(tmp_path / "notes", "no category folders"):
        find_categories(tmp_path / "notes")
    with raises_naming(tmp_path / "missing", "not found"):
        find_categories(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# unreadable files


def test_image_path_does_not_exist(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "ghost.png", "not found"):
        load_image(tmp_path / "ghost.png")


def test_zero_byte_image(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with raises_naming(path, "0 bytes"):
        load_image(path)


def test_unreadable_image(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a PNG at all" * 10)
    with raises_naming(path, "not a readable image"):
        load_image(path)


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_image(tmp_path: Path, fmt: str, suffix: str) -> None:
    data = _noise_png_bytes(fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with raises_naming(path, "truncated"):
        load_image(path)


def test_unreadable_and_missing_mask(tmp_path: Path) -> None:
    path = tmp_path / "m_mask.png"
    path.write_bytes(b"\x89PNG broken")
    with raises_naming(path):
        load_mask(path, (16, 16))
    with raises_naming(tmp_path / "none_mask.png", "not found"):
        load_mask(tmp_path / "none_mask.png", (16, 16))


def test_mask_size_differs_from_image(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    mask = _save(cat / "ground_truth" / "crack" / "000_mask.png", np.zeros((10, 12), np.uint8))
    image = cat / "test" / "crack" / "000.png"
    samples = [s for s in mvtec_samples(cat, "test") if s.label == 1]
    with raises_naming(mask, str(image), "12x10", "16x16"):
        ImageDataset(samples, image_size=8)[0]
    with raises_naming(mask, "12x10"):
        load_mask(mask, (16, 16))


def test_iterate_batches_propagates_first_failing_file(tmp_path: Path) -> None:
    cat = _category(tmp_path, n_train=6)
    broken = cat / "train" / "good" / "003.png"
    broken.write_bytes(b"")
    dataset = ImageDataset(mvtec_samples(cat, "train"), image_size=8)
    with raises_naming(broken, "0 bytes"):
        for _ in iterate_batches(dataset, batch_size=2, threads=2):
            pass


# ---------------------------------------------------------------------------------------------
# modes, orientation, tensors


def _roundtrip(tmp_path: Path, image: Image.Image, name: str, **params) -> Image.Image:
    path = tmp_path / name
    image.save(path, **params)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == image.size
    return loaded


def _pixel(img: Image.Image) -> np.ndarray:
    return np.asarray(img)[4, 4].astype(int)


def test_modes_convert_to_rgb(tmp_path: Path) -> None:
    size = (16, 8)
    assert (_pixel(_roundtrip(tmp_path, Image.new("L", size, 100), "l.png")) == 100).all()
    assert (_pixel(_roundtrip(tmp_path, Image.new("1", size, 1), "one.png")) == 255).all()
    assert (_pixel(_roundtrip(tmp_path, Image.new("LA", size, (100, 0)), "la.png")) == 100).all()
    assert list(_pixel(_roundtrip(tmp_path, Image.new("RGB", size, (10, 20, 30)), "rgb.png"))) == [10, 20, 30]
    assert list(_pixel(_roundtrip(tmp_path, Image.new("RGBA", size, (10, 20, 30, 0)), "rgba.png"))) == [10, 20, 30]
    palette = Image.new("P", size, 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert list(_pixel(_roundtrip(tmp_path, palette, "p.png"))) == [200, 10, 10]
    assert list(_pixel(_roundtrip(tmp_path, palette, "pt.png", transparency=0))) == [200, 10, 10]
    cmyk = _pixel(_roundtrip(tmp_path, Image.new("CMYK", size, (0, 255, 255, 0)), "cmyk.jpg", quality=95))
    assert np.abs(cmyk - [255, 0, 0]).max() <= 8  # red


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    path = _save(tmp_path / "deep.png", ramp)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"
    loaded = np.asarray(load_image(path))[..., 0].astype(int)
    assert loaded[0, 0] == 0 and loaded[-1, -1] == 255
    expected = np.rint(ramp / 257.0).astype(int)
    assert np.abs(loaded - expected).max() <= 1
    assert len(np.unique(loaded)) > 200  # a real ramp, not a saturated image


def test_int32_and_float_images(tmp_path: Path) -> None:
    wide = _save(tmp_path / "wide.tif", np.full((8, 8), 40000, np.int32))
    with Image.open(wide) as stored:
        assert stored.mode == "I"
    assert (_pixel(load_image(wide)) == 156).all()  # 40000 / 257
    unit = _save(tmp_path / "unit.tif", np.full((8, 8), 0.5, np.float32))
    assert (_pixel(load_image(unit)) == 128).all()
    byte_range = _save(tmp_path / "bytes.tif", np.full((8, 8), 100.0, np.float32))
    assert (_pixel(load_image(byte_range)) == 100).all()


def _oriented_jpeg(path: Path, orientation: int = 6) -> Path:
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red
    pixels[:, 32:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = _oriented_jpeg(tmp_path / "rotated.jpg")  # 6: display rotated 90 degrees clockwise
    img = load_image(path)
    assert img.size == (32, 64)
    pixels = np.asarray(img).astype(int)
    assert np.abs(pixels[8, 16] - [255, 0, 0]).max() < 40  # top is the former left half
    assert np.abs(pixels[56, 16] - [0, 0, 255]).max() < 40
    mask = _save(tmp_path / "rotated_mask.png", np.zeros((64, 32), np.uint8))
    assert load_mask(mask, img.size).shape == (64, 32)


def test_masks_are_binary_nonzero_is_defect(tmp_path: Path) -> None:
    values = np.array([[0, 1, 128, 255]] * 4, np.uint8)
    assert load_mask(_save(tmp_path / "grey.png", values), (4, 4)).tolist() == [[False, True, True, True]] * 4
    colour = np.zeros((4, 4, 4), np.uint8)
    colour[0, 0] = (0, 0, 9, 0)
    colour[1, 1] = (0, 0, 0, 255)  # alpha alone is not a defect
    rgba = load_mask(_save(tmp_path / "rgba.png", colour), (4, 4))
    assert rgba.dtype == bool and rgba.sum() == 1 and rgba[0, 0]
    y, x = np.mgrid[0:64, 0:64]
    disc = (y - 30) ** 2 + (x - 27) ** 2 < 15**2
    lossy = load_mask(_save(tmp_path / "lossy.jpg", disc.astype(np.uint8) * 255, quality=75), (64, 64))
    assert np.array_equal(lossy, disc)  # JPEG ringing around the edge is not defect


def test_mask_to_tensor_nearest_stays_binary() -> None:
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    small = mask_to_tensor(mask, 2)
    assert small.dtype == torch.bool and small.tolist() == [[True, False], [False, False]]
    big = mask_to_tensor(mask, (16, 12))
    assert big.shape == (16, 12) and big.sum() == 8 * 6
    odd = mask_to_tensor(np.random.default_rng(0).random((37, 53)) > 0.5, 20)
    assert set(odd.unique().tolist()) <= {False, True}


def test_image_to_tensor() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    same = image_to_tensor(img, (90, 120))
    assert same.dtype == torch.float32 and same.is_contiguous()
    assert torch.equal(same, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    square = image_to_tensor(img, 32)
    assert square.shape == (3, 32, 32) and square.min() >= 0.0 and square.max() <= 1.0
    exact = F.interpolate(
        torch.from_numpy(pixels).permute(2, 0, 1)[None].double() / 255, size=(32, 32), mode="bilinear", antialias=True
    )[0]
    assert (square.double() - exact).abs().max() <= 1.01 / 255
    assert image_to_tensor(img, (50, 30)).shape == (3, 50, 30)


def test_large_jpeg_draft_matches_full_decode(tmp_path: Path) -> None:
    y, x = np.mgrid[0:1200, 0:1000]
    pixels = np.stack([x * 255 // 999, y * 255 // 1199, ((x // 100 + y // 100) % 2) * 255], axis=2).astype(np.uint8)
    path = _save(tmp_path / "big.jpg", pixels, quality=95)
    _save(tmp_path / "big_mask.png", (pixels[..., 2] > 0).astype(np.uint8) * 255)
    drafted, full_size = read_image(path, draft_to=128)
    assert full_size == (1000, 1200) and drafted.size == (500, 600)
    sample = Sample(path, 1, "checker", tmp_path / "big_mask.png", "synthetic")
    item = ImageDataset([sample], image_size=128)[0]
    reference = image_to_tensor(load_image(path), 128)
    assert (item["image"] - reference).abs().mean() < 0.5 / 255
    assert (item["image"] - reference).abs().max() < 6 / 255
    assert item["mask"].float().mean() == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------------------------------------
# dataset and batches


def test_dataset_items_and_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = _category(tmp_path, n_train=1, defects=("crack", "dent", "scratch"))
    dataset = ImageDataset(mvtec_samples(cat, "test"), image_size=(12, 10))
    item = dataset[0]
    assert item["image"].shape == (3, 12, 10) and item["mask"].shape == (12, 10)
    assert item["mask"].any() and item["label"] == 1 and item["defect_type"] == "crack"
    monkeypatch.setenv("DEFECTSCOPE_NO_PROGRESS", "1")
    batches = list(iterate_batches(dataset, batch_size=3, threads=2, desc="test"))
    assert [len(b["path"]) for b in batches] == [3, 1]
    first = batches[0]
    assert first["image"].shape == (3, 3, 12, 10) and first["image"].dtype == torch.float32
    assert first["mask"].shape == (3, 12, 10) and first["mask"].dtype == torch.bool
    assert first["has_mask"].dtype == torch.bool and first["has_mask"].all()
    assert first["label"].dtype == torch.long and first["label"].tolist() == [1, 1, 0]
    assert first["defect_type"] == ["crack", "dent", "good"] and first["category"] == ["widget"] * 3
    sequential = list(iterate_batches(dataset, batch_size=3, threads=1))
    paths = [p for b in batches for p in b["path"]]
    assert paths == [p for b in sequential for p in b["path"]] == [str(s.path) for s in dataset.samples]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, sequential))


def test_progress_bar_and_early_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = ImageDataset(mvtec_samples(_category(tmp_path, n_train=8), "train"), image_size=8)
    monkeypatch.delenv("DEFECTSCOPE_NO_PROGRESS", raising=False)
    first = next(iter(iterate_batches(dataset, batch_size=2, desc="decoding")))  # abandoned generator
    assert len(first["path"]) == 2
    list(iterate_batches(dataset, batch_size=4, desc="decoding"))
    assert "decoding" in capsys.readouterr().err
    monkeypatch.setenv("DEFECTSCOPE_NO_PROGRESS", "1")
    list(iterate_batches(dataset, batch_size=4, desc="decoding"))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# real data


def _count(samples: list[Sample]) -> tuple[int, int, int]:
    good = sum(s.label == 0 for s in samples)
    return good, len(samples) - good, sum(s.mask_path is not None for s in samples)


def test_bottle_loads(bottle_root: Path) -> None:
    assert _count(mvtec_samples(bottle_root, "train")) == (209, 0, 0)
    test = mvtec_samples(bottle_root, "test")
    assert _count(test) == (20, 63, 63)
    assert {s.defect_type for s in test} == {"good", "broken_large", "broken_small", "contamination"}
    picked = [test[0], test[25], test[50], next(s for s in test if s.label == 0)]
    batch = next(iterate_batches(ImageDataset(picked, image_size=224), batch_size=4))
    assert batch["image"].shape == (4, 3, 224, 224)
    assert batch["mask"][:3].flatten(1).any(dim=1).all() and not batch["mask"][3].any()
    assert batch["has_mask"].all()
    assert find_categories(bottle_root.parent) == [bottle_root]


def test_mtd_loads(mtd_root: Path) -> None:
    assert _count(mvtec_samples(mtd_root, "train")) == (762, 0, 0)
    test = mvtec_samples(mtd_root, "test")
    assert _count(test) == (190, 392, 392)
    by_name = {s.path.name: s for s in test}
    crack = next(s for s in test if s.defect_type == "crack")
    empty = by_name["exp3_num_45042.jpg"]  # one of the 4 'uneven' masks that are empty in the source
    good = next(s for s in test if s.label == 0)
    assert load_image(crack.path).size != load_image(good.path).size  # sizes vary
    items = [ImageDataset([s], image_size=256)[0] for s in (crack, empty, good)]
    image = items[0]["image"]
    assert image.shape == (3, 256, 256) and torch.equal(image[0], image[1])  # grey -> RGB
    assert items[0]["mask"].any()
    assert items[1]["has_mask"] and not items[1]["mask"].any()
    assert items[2]["has_mask"] and not items[2]["mask"].any()


def test_bundled_example_loads(example_root: Path) -> None:
    assert _count(mvtec_samples(example_root, "train")) == (30, 0, 0)
    test = mvtec_samples(example_root, "test")
    assert _count(test) == (8, 9, 9)
    dataset = ImageDataset(test, image_size=256)
    masks = torch.stack([dataset[i]["mask"] for i in range(len(dataset)) if test[i].label == 1])
    assert masks.flatten(1).any(dim=1).all()
    assert load_image(test[0].path).size == (256, 256)
    assert (example_root / "LICENSE.mvtec.txt").is_file() and (example_root / "README.md").is_file()
