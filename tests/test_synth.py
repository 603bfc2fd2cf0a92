"""Synthetic anomalies on the bundled example: exact masks, reproducibility, the dataset wrapper and the CLI."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.cli import main
from defectscope.data import ImageDataset, mvtec_samples
from defectscope.data.synth import (
    KINDS,
    CropPaste,
    CutPaste,
    PerlinTexture,
    SynthDataset,
    Synthesizer,
    make_synthesizer,
    perlin_mask,
    perlin_noise,
)
from defectscope.errors import DefectscopeError
from defectscope.runs.synthesis import changed_pixels, round_robin, to_uint8

SIZE = 96


@pytest.fixture(scope="module")
def good(example_root: Path) -> ImageDataset:
    return ImageDataset(mvtec_samples(example_root, "train"), SIZE)


@pytest.fixture(scope="module")
def defects(example_root: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    labelled = ImageDataset([s for s in mvtec_samples(example_root, "test") if s.label == 1][:3], SIZE)
    return [(item["image"], item["mask"]) for item in (labelled[i] for i in range(len(labelled)))]


@pytest.fixture(scope="module")
def synthesizers(defects: list) -> dict[str, Synthesizer]:
    return {kind: make_synthesizer(kind, defects=defects if kind == "croppaste" else None) for kind in KINDS}


def assert_exact(image: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> None:
    """Outside the mask bit-identical, inside changed by at least one grey level, everything in [0, 1]."""
    assert out.shape == image.shape and mask.shape == image.shape[1:] and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    inside = mask.bool()
    assert torch.equal(out[:, ~inside], image[:, ~inside])
    assert bool(((out - image).abs().amax(dim=0)[inside] >= 1 / 255).all())
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_masks_are_exactly_the_changed_pixels(kind: str, synthesizers: dict, good: ImageDataset) -> None:
    synthesizer = synthesizers[kind]
    assert synthesizer.kind == kind
    areas = []
    for i in range(6):
        image = good[i]["image"]
        out, mask = synthesizer(image, np.random.default_rng([1, i]))
        assert_exact(image, out, mask)
        areas.append(float(mask.mean()))
    assert min(areas) > 0.0, "every kind with probability 1 changes some pixels on the bottle images"
    assert len(set(areas)) > 1


def test_perlin_and_cutpaste_change_most_of_their_region(good: ImageDataset) -> None:
    """The visible-change rule only trims a few pixels: most of the drawn shape really changes."""
    image = good[0]["image"]
    for seed in range(4):
        rng = np.random.default_rng(seed)
        rng.random()  # PerlinTexture first draws whether to make an anomaly at all
        region = torch.from_numpy(perlin_mask((SIZE, SIZE), rng))
        _, mask = PerlinTexture(beta=(0.1, 0.9))(image, np.random.default_rng(seed))
        assert float((mask.bool() & region).sum()) >= 0.8 * float(region.sum())
    _, mask = CutPaste("patch")(image, np.random.default_rng(0))
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert float(mask.sum()) >= 0.5 * float(box)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_result_other_seed_differs(kind: str, synthesizers: dict, good: ImageDataset) -> None:
    image = good[3]["image"]
    first = synthesizers[kind](image, np.random.default_rng(7))
    again = synthesizers[kind](image, np.random.default_rng(7))
    other = synthesizers[kind](image, np.random.default_rng(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_perlin_noise_and_mask() -> None:
    noise = perlin_noise((64, 80), (4, 5), np.random.default_rng(0))
    assert noise.shape == (64, 80) and noise.dtype == np.float32
    assert -1.0 <= noise.min() < -0.2 and 0.2 < noise.max() <= 1.0
    masks = [perlin_mask((64, 64), np.random.default_rng(seed)) for seed in range(8)]
    assert all(m.dtype == bool and m.shape == (64, 64) and m.mean() >= 0.005 for m in masks)
    assert len({m.tobytes() for m in masks}) == 8
    assert np.array_equal(masks[0], perlin_mask((64, 64), np.random.default_rng(0)))


@pytest.mark.parametrize("kind", KINDS)
def test_probability_zero_leaves_the_image_alone(kind: str, defects: list, good: ImageDataset) -> None:
    synthesizer = make_synthesizer(kind, defects=defects if kind == "croppaste" else None, probability=0.0)
    image = good[0]["image"]
    out, mask = synthesizer(image, np.random.default_rng(0))
    assert torch.equal(out, image) and not mask.any() and mask.shape == (SIZE, SIZE)


def test_probability_half_makes_some_anomalies(good: ImageDataset) -> None:
    synthesizer = PerlinTexture(probability=0.5)
    made = [bool(synthesizer(good[0]["image"], np.random.default_rng(i))[1].any()) for i in range(20)]
    assert 3 <= sum(made) <= 17


def test_texture_sources(tmp_path: Path, good: ImageDataset) -> None:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):  # other sizes than the images: resized on demand
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    image = good[0]["image"]
    from_folder = PerlinTexture(texture_dir=tmp_path)
    assert from_folder.texture_source == "folder"
    out, mask = from_folder(image, np.random.default_rng(0))
    assert_exact(image, out, mask)
    assert mask.any()
    given = PerlinTexture(textures=[torch.rand(3, 40, 40)])
    assert given.texture_source == "given"
    assert_exact(image, *given(image, np.random.default_rng(0)))
    assert PerlinTexture().texture_source == "training images"
    with pytest.raises(DefectscopeError, match="texture folder not found"):
        PerlinTexture(texture_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefectscopeError, match="no texture images"):
        make_synthesizer("perlin", texture_dir=tmp_path / "empty")


def test_bad_kinds_and_missing_defects(defects: list) -> None:
    with pytest.raises(DefectscopeError, match="croppaste needs labelled defects"):
        make_synthesizer("croppaste")
    with pytest.raises(DefectscopeError, match="unknown anomaly kind 'blur'"):
        make_synthesizer("blur")
    with pytest.raises(DefectscopeError, match="perlin kind only"):
        make_synthesizer("scar", texture_dir="x")
    with pytest.raises(DefectscopeError, match="at least one labelled defect"):
        CropPaste([])
    image, mask = defects[0]
    with pytest.raises(DefectscopeError, match="mask is empty"):
        CropPaste([(image, torch.zeros_like(mask))])
    assert CutPaste("scar").kind == "scar" and CutPaste().kind == "cutpaste"


def test_synth_dataset_is_deterministic_per_seed_epoch_index(good: ImageDataset) -> None:
    dataset = SynthDataset(good, CutPaste(), seed=5)
    assert len(dataset) == len(good)
    item = dataset[2]
    assert {"image", "mask", "path", "synth_image", "synth_mask"} <= set(item)
    assert item["synth_mask"].dtype == torch.float32 and item["synth_image"].shape == (3, SIZE, SIZE)
    again = SynthDataset(good, CutPaste(), seed=5)[2]
    assert torch.equal(item["synth_image"], again["synth_image"])
    assert torch.equal(dataset[-1]["synth_mask"], dataset[len(dataset) - 1]["synth_mask"])
    dataset.epoch = 1
    assert not torch.equal(item["synth_mask"], dataset[2]["synth_mask"])
    assert not torch.equal(item["synth_mask"], SynthDataset(good, CutPaste(), seed=6)[2]["synth_mask"])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_cli_writes_mvtec_layout_with_exact_masks(
    example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "synth"
    argv = [
        "synth",
        str(example_root),
        "--kind",
        "perlin",
        "--count",
        "3",
        "--out",
        str(out),
        "--image-size",
        str(SIZE),
        "--seed",
        "4",
    ]
    assert main(argv) == 0
    assert str(out / "test" / "perlin") in capsys.readouterr().out
    images = sorted((out / "test" / "perlin").iterdir())
    masks = sorted((out / "ground_truth" / "perlin").iterdir())
    assert [p.name for p in images] == ["000.png", "001.png", "002.png"]
    assert [p.name for p in masks] == ["000_mask.png", "001_mask.png", "002_mask.png"]
    readme = (out / "README.txt").read_text()
    assert "seed: 4" in readme and "texture source: training images" in readme

    good = ImageDataset(round_robin(mvtec_samples(example_root, "train"), 3), SIZE)
    regenerated = SynthDataset(good, make_synthesizer("perlin"), seed=4)
    for i, (image_path, mask_path) in enumerate(zip(images, masks)):
        written = np.asarray(Image.open(image_path).convert("RGB"))
        mask = np.asarray(Image.open(mask_path))
        item = regenerated[i]
        assert np.array_equal(written, to_uint8(item["synth_image"]))
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        assert np.array_equal(mask == 255, changed_pixels(to_uint8(item["image"]), written))
        assert (mask == 255).sum() >= 0.99 * float(item["synth_mask"].sum())

    assert main(argv) == 2  # never writes over what is there
    assert "not empty" in capsys.readouterr().err
    assert (
        main(
            ["synth", str(example_root), "--kind", "scar", "--count", "2", "--out", str(out), "--image-size", str(SIZE)]
        )
        == 0
    )  # another kind goes next to it, README keeps both
    assert "## perlin" in (out / "README.txt").read_text() and "## scar" in (out / "README.txt").read_text()


def test_cli_croppaste_and_errors(example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cp"
    assert (
        main(
            [
                "synth",
                str(example_root),
                "--kind",
                "croppaste",
                "--defects",
                str(example_root),
                "--defect-images",
                "2",
                "--count",
                "2",
                "--out",
                str(out),
                "--image-size",
                "64",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().err
    assert "broken_large/000.png" in printed and "broken_large/010.png" in printed
    assert "broken_large/019.png" not in printed
    assert len(list((out / "ground_truth" / "croppaste").iterdir())) == 2
    for argv, needle in [
        (["--kind", "croppaste"], "needs --defects"),
        (["--kind", "scar", "--textures", str(tmp_path)], "--textures is used by --kind perlin only"),
        (["--kind", "perlin", "--count", "0"], "--count: must be at least 1"),
    ]:
        full = ["synth", str(example_root), "--count", "1", "--out", str(tmp_path / "x"), *argv]
        assert main(full) == 2
        err = capsys.readouterr().err
        assert err.startswith("defectscope: error:") and needle in err and err.count("\n") == 1
