"""Hostile inputs: odd files in listings, broken or oversized images, suspicious test data.

Every unusable input must stop with a one-line DataError naming the file; nothing is skipped
silently and no raw warning (Pillow, numpy) reaches the user.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from defectscope.data import (
    DEFAULT_MAX_PIXELS,
    ImageDataset,
    folder_samples,
    image_files,
    image_to_tensor,
    is_ignored_name,
    iterate_batches,
    load_image,
    load_mask,
    max_image_pixels,
    mvtec_samples,
    read_image,
    set_max_image_pixels,
)
from defectscope.errors import DataError
from defectscope.metrics import assess, image_metrics
from helpers import raises_naming

pytestmark = pytest.mark.filterwarnings("error")  # any warning reaching the caller fails the test


def _save(path: Path, image: Image.Image, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **params)
    return path


def _png(path: Path, size: int = 16, value: int = 128) -> Path:
    return _save(path, Image.new("RGB", (size, size), (value, value, value)))


def _category(root: Path) -> Path:
    """A tiny MVTec-layout category: 2 good training images, 1 good and 1 cracked test image."""
    cat = root / "widget"
    for name in ("000.png", "001.png"):
        _png(cat / "train" / "good" / name)
    _png(cat / "test" / "good" / "000.png")
    _png(cat / "test" / "crack" / "000.png", value=200)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    _save(cat / "ground_truth" / "crack" / "000_mask.png", Image.fromarray(mask))
    return cat


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes that declare a huge greyscale PNG (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for name in ("b.png", "a.png"):
        _png(folder / name)
    return folder


# ---------------------------------------------------------------------------------------------
# listing: predict's inputs and dataset folders follow one set of rules


def test_image_files_lists_folders_and_files(images: Path, tmp_path: Path) -> None:
    other = _png(tmp_path / "c.jpg")
    assert image_files([images, str(other)]) == [images / "a.png", images / "b.png", other]


def test_image_files_does_not_walk_subfolders(images: Path) -> None:
    sub = images / "more"
    _png(sub / "c.png")
    with raises_naming(sub, "not searched recursively", f"name {sub} as well"):
        image_files([images])
    assert image_files([images / "a.png", sub]) == [images / "a.png", sub / "c.png"]


def test_folder_named_like_an_image(images: Path) -> None:
    (images / "x.png").mkdir()
    with raises_naming(images / "x.png", "folder named like a .png image"):
        image_files([images])
    with raises_naming(images / "x.png", "unexpected folder"):
        folder_samples(images)


def _fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    os.mkfifo(path)
    return path


def _dangling(path: Path) -> Path:
    path.symlink_to(path.parent / "missing-target.png")
    return path


def _loop(path: Path) -> Path:
    path.symlink_to(path)
    return path


SPECIAL = [(_fifo, "FIFO"), (_dangling, "dangling symlink"), (_loop, "symlink loop")]


@pytest.mark.parametrize(("make", "fragment"), SPECIAL)
def test_special_files_stop_every_listing(tmp_path: Path, make, fragment: str) -> None:
    folder = tmp_path / "images"
    _png(folder / "a.png")
    special = make(folder / "z.png")
    with raises_naming(special, fragment):
        image_files([folder])
    with raises_naming(special, fragment):
        image_files([special])
    with raises_naming(special, fragment):
        folder_samples(folder)
    cat = _category(tmp_path)
    for split, place in (
        ("train", "train/good"),
        ("test", "test/good"),
        ("test", "test/crack"),
        ("test", "ground_truth/crack"),
    ):
        target = make(cat / place / "zz.png")
        with raises_naming(target, fragment):
            mvtec_samples(cat, split)
        target.unlink()


def test_unreadable_file(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = images / "a.png"
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root reads every file: deny this one by hand
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    else:
        locked.chmod(0)
    try:
        with raises_naming(locked, "permission denied"):
            image_files([images])
        with raises_naming(locked, "permission denied"):
            folder_samples(images)
    finally:
        locked.chmod(0o644)


def test_explicit_non_image_and_missing_paths(images: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with raises_naming(notes, "not an image file"):
        image_files([images, notes])
    with raises_naming(tmp_path / "ghost.png", "no such file"):
        image_files([tmp_path / "ghost.png"])
    (tmp_path / "empty").mkdir()
    with raises_naming(tmp_path / "empty", "holds no images"):
        image_files([tmp_path / "empty"])
    with pytest.raises(DataError):
        image_files([])


def test_ignored_names_are_the_same_everywhere(images: Path, tmp_path: Path) -> None:
    for name in ("Thumbs.db", "THUMBS.DB", "desktop.ini", ".DS_Store", "._a.png"):
        (images / name).write_bytes(b"metadata")
    (images / "__MACOSX").mkdir()
    assert all(is_ignored_name(name) for name in ("Thumbs.db", "thumbs.db", ".hidden.png", "__MACOSX"))
    assert not is_ignored_name("part.png")
    listed = [images / "a.png", images / "b.png"]
    assert image_files([images]) == listed
    assert image_files(sorted(images.iterdir())) == listed  # what the shell's folder/* passes
    assert [s.path for s in folder_samples(images)] == listed
    with raises_naming(images / "Thumbs.db", "ignored"):
        image_files([images / "Thumbs.db"])
    cat = _category(tmp_path)
    for place in ("train/good", "test", "test/good", "ground_truth/crack"):
        (cat / place / "Thumbs.db").write_bytes(b"metadata")
    assert len(mvtec_samples(cat, "train")) == 2 and len(mvtec_samples(cat, "test")) == 2


def test_duplicates_are_listed_once(images: Path, tmp_path: Path) -> None:
    link = tmp_path / "alias.png"
    link.symlink_to(images / "a.png")
    assert image_files([images, images / "a.png", link, str(images) + "/"]) == [images / "a.png", images / "b.png"]
    assert image_files([link, images]) == [link, images / "b.png"]


def test_non_image_file_in_ground_truth(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    stray = cat / "ground_truth" / "crack" / "readme.txt"
    stray.write_text("masks")
    with raises_naming(stray, "not an image file"):
        mvtec_samples(cat, "test")
    stray.unlink()
    fake = cat / "ground_truth" / "crack" / "000_mask.png"
    fake.write_text("not a mask")
    sample = next(s for s in mvtec_samples(cat, "test") if s.label == 1)
    with raises_naming(fake, "not a readable image"):
        ImageDataset([sample], image_size=8)[0]


@pytest.mark.parametrize("place", ["train/good", "test/good"])
def test_mask_among_good_images(tmp_path: Path, place: str) -> None:
    cat = _category(tmp_path)
    mask = _png(cat / place / "000_mask.png", value=0)
    with raises_naming(mask, "ground-truth mask"):
        mvtec_samples(cat, place.split("/")[0])
    with raises_naming(mask, "ground-truth mask"):
        folder_samples(cat / place)


# ---------------------------------------------------------------------------------------------
# hostile image files


def test_oversized_image_is_refused_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    bomb = _bomb_png(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 2000
    with raises_naming(bomb, "30000x30000", "over the limit", str(DEFAULT_MAX_PIXELS)):
        load_image(bomb)
    # Between our limit and Pillow's error threshold, where Pillow would only warn.
    big = _bomb_png(tmp_path / "big.png", 10000, 10000)
    with raises_naming(big, "10000x10000", "DEFECTSCOPE_MAX_PIXELS"):
        load_image(big)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS

    image = _png(tmp_path / "twenty.png", size=20)
    monkeypatch.setenv("DEFECTSCOPE_MAX_PIXELS", "399")
    assert max_image_pixels() == 399
    with raises_naming(image, "20x20 = 400 pixels", "limit of 399"):
        read_image(image)
    monkeypatch.setenv("DEFECTSCOPE_MAX_PIXELS", "400")
    assert load_image(image).size == (20, 20)
    monkeypatch.setenv("DEFECTSCOPE_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match="DEFECTSCOPE_MAX_PIXELS"):
        load_image(image)
    monkeypatch.delenv("DEFECTSCOPE_MAX_PIXELS")
    try:
        set_max_image_pixels(100)
        with raises_naming(image, "limit of 100"):
            load_image(image)
        with pytest.raises(ValueError):
            set_max_image_pixels(0)
    finally:
        set_max_image_pixels(None)
    assert max_image_pixels() == DEFAULT_MAX_PIXELS == 8192 * 8192


def test_oversized_image_stops_a_threaded_batch(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    for i in range(6):
        _png(folder / f"{i}.png")
    bomb = _bomb_png(folder / "3.png", 20000, 20000)
    dataset = ImageDataset(folder_samples(folder), image_size=8)
    with raises_naming(bomb, "20000x20000"):
        for _ in iterate_batches(dataset, batch_size=2, threads=2):
            pass


def _frames(size: tuple[int, int] = (8, 8)) -> list[Image.Image]:
    return [Image.new("RGB", size, (80 * i, 0, 0)) for i in range(3)]


@pytest.mark.parametrize("name", ["anim.gif", "anim.png", "anim.webp", "pages.tif"])
def test_animated_or_multi_page_files_are_refused(tmp_path: Path, name: str) -> None:
    first, *rest = _frames()
    path = _save(tmp_path / name, first, save_all=True, append_images=rest)
    with raises_naming(path, "3 frames"):
        load_image(path)


def test_single_frame_gif_and_tiff_are_fine(tmp_path: Path) -> None:
    assert load_image(_save(tmp_path / "one.gif", _frames()[1])).size == (8, 8)
    assert load_image(_save(tmp_path / "one.tif", _frames()[1])).size == (8, 8)


def _jpeg_with_exif(path: Path, exif: bytes | Image.Exif) -> Path:
    return _save(path, Image.new("RGB", (16, 8), (200, 0, 0)), exif=exif)


def test_broken_exif_orientation_keeps_the_stored_pixels(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 99  # outside 1..8
    assert read_image(_jpeg_with_exif(tmp_path / "odd.jpg", exif))[1] == (16, 8)
    corrupt = b"Exif\0\0MM\0*\0\0\0\x08\0\x05\x01\x12\0\x03\0\0\0\x01\0\x06"  # declares 5 tags, holds one
    img, size = read_image(_jpeg_with_exif(tmp_path / "corrupt.jpg", corrupt))
    assert size == (16, 8) and img.size == (16, 8)


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path: Path, fmt: str, cut: float) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = _save(tmp_path / f"whole.{fmt.lower()}", Image.fromarray(pixels), format=fmt).read_bytes()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(whole[: int(len(whole) * cut)])
    with raises_naming(path):
        load_image(path)


@pytest.mark.parametrize("content", [b"", b"hello, I am text\n", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"])
def test_files_that_are_not_images(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    with raises_naming(path):
        load_image(path)
    with raises_naming(path):
        load_mask(path, (8, 8))


def test_accepted_odd_images(tmp_path: Path) -> None:
    """Tiny, 16-bit, alpha and CMYK images are usable; they load as RGB without warnings."""
    paths = [
        _save(tmp_path / "dot.png", Image.new("RGB", (1, 1), (9, 9, 9))),
        _save(tmp_path / "deep.png", Image.fromarray(np.full((8, 8), 65535, np.uint16))),
        _save(tmp_path / "alpha.png", Image.new("RGBA", (8, 8), (10, 20, 30, 0))),
        _save(tmp_path / "print.jpg", Image.new("CMYK", (8, 8), (0, 0, 0, 0))),
        _save(tmp_path / "palette.png", Image.new("P", (8, 8), 3), transparency=3),
    ]
    dataset = ImageDataset(folder_samples(tmp_path), image_size=8)
    batch = next(iterate_batches(dataset, batch_size=len(paths)))
    assert batch["image"].shape == (5, 3, 8, 8)
    assert load_image(paths[0]).size == (1, 1)
    assert np.asarray(load_image(paths[1])).min() == 255


def test_large_image_resize_stays_close_to_exact() -> None:
    y, x = np.mgrid[0:1200, 0:1000]
    pixels = np.stack([x * 255 // 999, y * 255 // 1199, ((x // 100 + y // 100) % 2) * 255], axis=2).astype(np.uint8)
    resized = image_to_tensor(Image.fromarray(pixels), 128).double()  # box-reduced by 2 first
    exact = F.interpolate(
        torch.from_numpy(pixels).permute(2, 0, 1)[None].double() / 255, size=(128, 128), mode="bilinear", antialias=True
    )[0]
    assert (resized - exact).abs().mean() < 0.5 / 255 and (resized - exact).abs().max() < 3 / 255


def test_mask_checks(tmp_path: Path) -> None:
    small = _save(tmp_path / "small_mask.png", Image.new("L", (4, 4), 255))
    with raises_naming(small, "4x4", "8x8"):
        load_mask(small, (8, 8))
    grey = _save(tmp_path / "grey_mask.png", Image.fromarray(np.array([[0, 1, 128, 255]] * 4, np.uint8)))
    assert load_mask(grey, (4, 4)).tolist() == [[False, True, True, True]] * 4


# ---------------------------------------------------------------------------------------------
# suspicious test data becomes notes, never a raw warning


def _case(n_good: int = 3, n_defect: int = 3, size: int = 8) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    labels = np.array([0] * n_good + [1] * n_defect)
    scores = labels + rng.random(labels.size)
    masks = np.zeros((labels.size, size, size), bool)
    masks[n_good:, 2:5, 2:5] = True
    maps = rng.random(masks.shape).astype(np.float32) + masks
    return labels, scores, masks, maps


def test_one_empty_mask_is_named_and_counted(tmp_path: Path) -> None:
    labels, scores, masks, maps = _case()
    masks[4] = False
    names = [f"img{i}.png" for i in range(labels.size)]
    metrics, curves, notes = assess(labels, scores, masks, maps, np.ones(labels.size, bool), names)
    assert len(notes) == 1 and notes[0].startswith("img4.png: ") and "counts as defective" in notes[0]
    assert metrics["image_auroc"] == image_metrics(labels, scores)["image_auroc"]
    assert 0.0 < metrics["pixel_auroc"] <= 1.0 and "pro" in curves


def test_all_masks_empty_skips_pixel_metrics() -> None:
    labels, scores, masks, maps = _case()
    metrics, _, notes = assess(labels, scores, np.zeros_like(masks), maps, np.ones(labels.size, bool))
    expected = (
        "pixel metrics skipped: the ground-truth masks of all 3 defect images are empty "
        "(no defective pixel); they still count as defective for the image metrics"
    )
    assert notes == [expected]
    assert set(metrics) == {"image_auroc", "image_ap", "image_f1_max"}


def test_many_empty_masks_are_counted_past_ten() -> None:
    labels, scores, masks, maps = _case(n_defect=14)
    masks[3:15] = False  # 12 of 14 defect masks empty
    _, _, notes = assess(labels, scores, masks, maps)
    assert len(notes) == 11 and notes[-1] == "2 more defect images with an empty mask not named here"


def test_undefined_metrics_become_notes() -> None:
    labels, scores, masks, maps = _case()
    assert assess(labels[:3], scores[:3])[2] == [
        "ranking metrics skipped: they need good and defective images, all 3 are good"
    ]
    assert assess(labels[:0], scores[:0])[2] == ["metrics skipped: no image was scored"]
    bad = scores.copy()
    bad[1] = np.nan
    metrics, _, notes = assess(labels, bad, masks, maps, names=list("abcdef"))
    assert (
        metrics == {} and notes[0].endswith("1 image(s) have a non-finite score") and notes[1] == "b: non-finite score"
    )
    maps[5, 0, 0] = np.inf
    metrics, _, notes = assess(labels, scores, masks, maps, names=list("abcdef"))
    assert "pixel_auroc" not in metrics and "image_auroc" in metrics
    assert notes == [
        "pixel metrics skipped: 1 anomaly map(s) hold non-finite values",
        "f: anomaly map holds non-finite values",
    ]
    image_only = np.array([True] * 5 + [False])
    assert "image-level only" in assess(labels, scores, masks, maps, image_only)[2][0]


def test_hidden_folder_named_directly_is_listed(tmp_path: Path) -> None:
    hidden = tmp_path / ".staging"
    _png(hidden / "a.png")
    assert image_files([hidden]) == [hidden / "a.png"]
    with raises_naming(tmp_path, "holds no images"):
        image_files([tmp_path])  # the hidden folder inside is ignored, not an error


def test_high_bit_depth_images(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 1100, dtype=np.uint16)[:, None], (1, 3))  # more rows than one band
    loaded = np.asarray(load_image(_save(tmp_path / "tall.png", Image.fromarray(ramp))))[..., 0].astype(int)
    assert np.abs(loaded - np.rint(ramp / 257.0)).max() <= 1
    nan = np.full((4, 4), np.nan, np.float32)
    path = _save(tmp_path / "nan.tif", Image.fromarray(nan))
    with raises_naming(path, "NaN"):
        load_image(path)
