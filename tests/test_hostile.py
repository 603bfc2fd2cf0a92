"""Hostile input through the command line, as a demanding new user would try it.

Every case runs ``defectscope ...`` and checks three things: the exit status; that a refusal is
exactly one ``defectscope: error:`` line on stderr naming the offending file or argument and the
problem, with no traceback; and that no earlier output changed (a previous model, predictions
file or test results keep their bytes and modes, and no temporary file is left next to them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from defectscope import load
from defectscope.checkpoint import sha256_file
from defectscope.cli import main
from defectscope.methods.model_file import CONFIG_FILE, TENSORS_FILE
from defectscope.outputs import MARKER

REPO = Path(__file__).resolve().parents[1]
FIT_ARGS = ["--image-size", "64", "--backbone", "mobilenet_v2", "--set", "num_neighbors=3"]
ERROR = "defectscope: error: "

Snapshot = dict[str, tuple[str, int, bytes | str | None]]


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFECTSCOPE_NO_PROGRESS", "1")
    monkeypatch.delenv("DEFECTSCOPE_MAX_PIXELS", raising=False)


# -- snapshots and the refusal check ----------------------------------------------------------------
def _snapshot(*roots: Path) -> Snapshot:
    """Kind, mode and content of every entry under ``roots`` (links not followed, FIFOs not read)."""
    found: Snapshot = {}
    for root in roots:
        entries = [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]
        for path in entries:
            try:
                info = path.lstat()
            except FileNotFoundError:
                found[str(path)] = ("missing", 0, None)
                continue
            if path.is_symlink():
                found[str(path)] = ("link", info.st_mode, os.readlink(path))
            elif path.is_dir():
                found[str(path)] = ("folder", info.st_mode, None)
            elif path.is_file():
                found[str(path)] = ("file", info.st_mode, path.read_bytes())
            else:
                found[str(path)] = ("special", info.st_mode, None)
    return found


def _stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _refused(
    capsys: pytest.CaptureFixture[str],
    argv: list[Any],
    *needles: str,
    watch: tuple[Path, ...] = (),
    status: int = 2,
) -> str:
    """Run ``argv``: exit ``status``, one error line holding every needle, nothing under ``watch`` changed."""
    before = _snapshot(*watch)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == status, err
    assert "Traceback" not in err and "Traceback" not in out, err
    errors = [line for line in _stderr_lines(err) if line.startswith("defectscope: error")]
    assert len(errors) == 1, err
    line = errors[0]
    assert _stderr_lines(err)[-1] == line, err  # the error is the last word
    assert len(line) < 800, line
    for needle in needles:
        assert needle in line, (needle, line)
    assert out == "", out  # nothing half-done on stdout
    assert _snapshot(*watch) == before
    return line


def _ok(capsys: pytest.CaptureFixture[str], argv: list[Any], status: int = 0) -> tuple[str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == status, err
    assert "Traceback" not in err and ERROR not in err, err
    return out, err


# -- the fitted run and earlier outputs -----------------------------------------------------------
@dataclass
class Workspace:
    """A private copy of the fitted run plus earlier outputs a failing command must not touch."""

    tmp: Path
    run: Path
    out: Path  # folder holding the earlier predictions file
    predictions: Path
    results: Path  # earlier `test --out` folder
    example: Path

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.run, self.out, self.results)


@pytest.fixture(scope="module")
def base(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    os.environ["DEFECTSCOPE_NO_PROGRESS"] = "1"
    assert main(["fit", str(example_root), "--out", str(root / "run"), *FIT_ARGS]) == 0
    (root / "out").mkdir()
    good = sorted((example_root / "test" / "good").iterdir())[:2]
    assert main(["predict", str(root / "run"), *map(str, good), "--out", str(root / "out" / "earlier.json")]) == 0
    assert main(["test", str(root / "run"), "--out", str(root / "results")]) == 0
    return root


@pytest.fixture
def ws(base: Path, tmp_path: Path, example_root: Path) -> Workspace:
    for name in ("run", "out", "results"):
        shutil.copytree(base / name, tmp_path / name)
    return Workspace(
        tmp_path,
        tmp_path / "run",
        tmp_path / "out",
        tmp_path / "out" / "earlier.json",
        tmp_path / "results",
        example_root,
    )


def _copy_images(example: Path, folder: Path, n: int = 2, split: str = "test/good") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder / p.name)) for p in sorted((example / split).iterdir())[:n]]


def _category(example: Path, root: Path) -> Path:
    """A small MVTec-layout copy of the example: 4 training images, 2 good and 2 defect test images."""
    cat = root / "widget"
    _copy_images(example, cat / "train" / "good", 4, "train/good")
    _copy_images(example, cat / "test" / "good", 2)
    images = _copy_images(example, cat / "test" / "broken_large", 2, "test/broken_large")
    (cat / "ground_truth" / "broken_large").mkdir(parents=True)
    for image in images:
        shutil.copy(
            example / "ground_truth" / "broken_large" / f"{image.stem}_mask.png", cat / "ground_truth" / "broken_large"
        )
    return cat


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(path: Path, side: int) -> Path:
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (side + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def _truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# -- images given to predict -----------------------------------------------------------------------
def _subfolder(folder: Path, example: Path) -> tuple[Path, str]:
    sub = folder / "more"
    _copy_images(example, sub, 1)
    return sub, "not searched recursively"


def _fifo(folder: Path, example: Path) -> tuple[Path, str]:
    os.mkfifo(folder / "z.png")
    return folder / "z.png", "FIFO"


def _dangling(folder: Path, example: Path) -> tuple[Path, str]:
    (folder / "z.png").symlink_to(folder / "gone.png")
    return folder / "z.png", "dangling symlink"


def _loop(folder: Path, example: Path) -> tuple[Path, str]:
    (folder / "z.png").symlink_to(folder / "z.png")
    return folder / "z.png", "symlink loop"


def _folder_named_png(folder: Path, example: Path) -> tuple[Path, str]:
    (folder / "x.png").mkdir()
    return folder / "x.png", "folder named like a .png image"


def _zero_bytes(folder: Path, example: Path) -> tuple[Path, str]:
    (folder / "z.png").write_bytes(b"")
    return folder / "z.png", "empty"


def _text_png(folder: Path, example: Path) -> tuple[Path, str]:
    (folder / "z.png").write_text("hello, I am a text file\n")
    return folder / "z.png", "not a readable image"


def _notes(folder: Path, example: Path) -> tuple[Path, str]:
    (folder / "notes.txt").write_text("shift 2")
    return folder / "notes.txt", "not an image file"


def _truncated_png(folder: Path, example: Path) -> tuple[Path, str]:
    return _truncated(folder / "z.png", sorted(folder.glob("*.png"))[0]), "z.png"


def _bomb(folder: Path, example: Path) -> tuple[Path, str]:
    return _bomb_png(folder / "z.png", 30000), "over the limit"


def _multi_page(folder: Path, example: Path) -> tuple[Path, str]:
    frames = [Image.new("RGB", (32, 32), (80 * i, 0, 0)) for i in range(3)]
    frames[0].save(folder / "z.tif", save_all=True, append_images=frames[1:])
    return folder / "z.tif", "3 frames"


def _nan_tiff(folder: Path, example: Path) -> tuple[Path, str]:
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(folder / "z.tif")
    return folder / "z.tif", "NaN"


PREDICT_INPUTS: list[Callable[[Path, Path], tuple[Path, str]]] = [
    _subfolder,
    _fifo,
    _dangling,
    _loop,
    _folder_named_png,
    _zero_bytes,
    _text_png,
    _notes,
    _truncated_png,
    _bomb,
    _multi_page,
    _nan_tiff,
]


@pytest.mark.parametrize("make", PREDICT_INPUTS, ids=[f.__name__.strip("_") for f in PREDICT_INPUTS])
def test_predict_refuses_a_bad_entry_in_a_folder(
    ws: Workspace, capsys: pytest.CaptureFixture[str], make: Callable[[Path, Path], tuple[Path, str]]
) -> None:
    folder = ws.tmp / "images"
    _copy_images(ws.example, folder)
    bad, needle = make(folder, ws.example)
    heatmaps = ws.tmp / "heatmaps"
    _refused(
        capsys,
        ["predict", ws.run, folder, "--out", ws.predictions, "--heatmaps", heatmaps],
        str(bad),
        needle,
        watch=(*ws.all, folder),
    )


def test_a_newline_in_a_file_name_stays_on_one_line(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    folder = ws.tmp / "images"
    _copy_images(ws.example, folder)
    (folder / "bad\nname.png").write_text("not an image")
    _refused(
        capsys,
        ["predict", ws.run, folder, "--out", ws.predictions],
        str(folder / "bad\\nname.png"),
        "not a readable image",
        watch=(*ws.all, folder),
    )


def test_predict_refuses_an_image_over_the_pixel_limit(
    ws: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ws.tmp / "images"
    images = _copy_images(ws.example, folder)
    monkeypatch.setenv("DEFECTSCOPE_MAX_PIXELS", "1000")
    _refused(
        capsys, ["predict", ws.run, folder, "--out", ws.predictions], str(images[0]), "limit of 1000", watch=ws.all
    )


def test_predict_refuses_a_pixel_limit_that_is_not_a_number(
    ws: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ws.tmp / "images"
    _copy_images(ws.example, folder)
    monkeypatch.setenv("DEFECTSCOPE_MAX_PIXELS", "lots")
    _refused(capsys, ["predict", ws.run, folder, "--out", ws.predictions], "DEFECTSCOPE_MAX_PIXELS", watch=ws.all)


def test_predict_ignores_thumbnail_caches(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    folder = ws.tmp / "images"
    images = _copy_images(ws.example, folder)
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store", "._000.png"):
        (folder / name).write_bytes(b"metadata")
    before = _snapshot(*ws.all)
    out, _ = _ok(capsys, ["predict", ws.run, folder])
    assert [r["path"] for r in json.loads(out)] == [str(p) for p in images]
    assert _snapshot(*ws.all) == before


def test_predict_refuses_only_ignored_names(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    thumbs = ws.tmp / "Thumbs.db"
    thumbs.write_bytes(b"metadata")
    _refused(capsys, ["predict", ws.run, thumbs, "--out", ws.predictions], str(thumbs), "ignored", watch=ws.all)


def test_predict_refuses_an_empty_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    (ws.tmp / "empty").mkdir()
    _refused(
        capsys,
        ["predict", ws.run, ws.tmp / "empty", "--out", ws.predictions],
        str(ws.tmp / "empty"),
        "holds no images",
        watch=ws.all,
    )


def test_predict_refuses_a_missing_image(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    ghost = ws.tmp / "ghost.png"
    _refused(capsys, ["predict", ws.run, ghost, "--out", ws.predictions], str(ghost), "no such file", watch=ws.all)


# -- datasets given to fit -------------------------------------------------------------------------
def _fit_refused(capsys: pytest.CaptureFixture[str], ws: Workspace, data: Path, *needles: str, extra=()) -> str:
    """``fit`` over the earlier model (``--overwrite``): refused, the earlier model intact."""
    return _refused(
        capsys, ["fit", data, "--out", ws.run, "--overwrite", *FIT_ARGS, *extra], *needles, watch=(*ws.all, data)
    )


def test_fit_refuses_an_empty_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    (ws.tmp / "empty").mkdir()
    _fit_refused(capsys, ws, ws.tmp / "empty", str(ws.tmp / "empty"), "nor a folder of images")


def test_fit_refuses_a_folder_of_thumbnail_caches(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    folder = ws.tmp / "thumbs"
    folder.mkdir()
    (folder / "Thumbs.db").write_bytes(b"metadata")
    _fit_refused(capsys, ws, folder, str(folder), "nor a folder of images")


def test_fit_refuses_a_missing_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    _fit_refused(capsys, ws, ws.tmp / "nowhere", str(ws.tmp / "nowhere"))


def test_fit_refuses_a_non_image_file(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    folder = ws.tmp / "good"
    _copy_images(ws.example, folder, 4, "train/good")
    (folder / "labels.csv").write_text("a,b\n")
    _fit_refused(capsys, ws, folder, str(folder / "labels.csv"), "not an image file")


def test_fit_refuses_a_subfolder_of_a_plain_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    folder = ws.tmp / "good"
    _copy_images(ws.example, folder, 4, "train/good")
    _copy_images(ws.example, folder / "older", 1, "train/good")
    _fit_refused(capsys, ws, folder, str(folder / "older"), "unexpected folder")


def test_fit_refuses_a_mask_among_good_training_images(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    mask = Path(shutil.copy(ws.example / "ground_truth" / "broken_large" / "000_mask.png", cat / "train" / "good"))
    _fit_refused(capsys, ws, cat, str(mask), "ground-truth mask")


def test_fit_refuses_a_truncated_training_image(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    bad = _truncated(cat / "train" / "good" / "zz.png", sorted((cat / "train" / "good").iterdir())[0])
    _fit_refused(capsys, ws, cat, str(bad))


def test_fit_refuses_a_zero_byte_training_image(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    (cat / "train" / "good" / "zz.png").write_bytes(b"")
    _fit_refused(capsys, ws, cat, str(cat / "train" / "good" / "zz.png"), "empty")


def test_fit_refuses_a_folder_named_like_an_image(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    (cat / "train" / "good" / "x.png").mkdir()
    _fit_refused(capsys, ws, cat, str(cat / "train" / "good" / "x.png"), "folder named like a .png image")


def test_fit_refuses_an_unknown_category(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    _category(ws.example, ws.tmp / "root")
    _fit_refused(
        capsys, ws, ws.tmp / "root", str(ws.tmp / "root" / "nope"), "no such category", extra=["--category", "nope"]
    )


def test_fit_refuses_an_image_file_as_data(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    image = _copy_images(ws.example, ws.tmp / "one", 1)[0]
    _fit_refused(capsys, ws, image, str(image))


# -- datasets given to test ------------------------------------------------------------------------
def _test_refused(capsys: pytest.CaptureFixture[str], ws: Workspace, data: Path, *needles: str, extra=()) -> str:
    return _refused(capsys, ["test", ws.run, data, "--out", ws.results, *extra], *needles, watch=(*ws.all, data))


def test_test_refuses_a_mask_among_good_test_images(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    mask = Path(shutil.copy(ws.example / "ground_truth" / "broken_large" / "000_mask.png", cat / "test" / "good"))
    _test_refused(capsys, ws, cat, str(mask), "ground-truth mask")


def test_test_refuses_a_defect_without_its_mask(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    (cat / "ground_truth" / "broken_large" / "000_mask.png").unlink()
    _test_refused(capsys, ws, cat, str(cat / "test" / "broken_large" / "000.png"), "--image-level-only")


def test_test_refuses_a_mask_of_another_size(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    mask = cat / "ground_truth" / "broken_large" / "010_mask.png"
    Image.new("L", (100, 100), 255).save(mask)
    _test_refused(capsys, ws, cat, str(mask), "100x100")


def test_test_refuses_a_text_file_named_like_a_mask(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    mask = cat / "ground_truth" / "broken_large" / "000_mask.png"
    mask.write_text("mask to follow")
    _test_refused(capsys, ws, cat, str(mask), "not a readable image")


def test_a_test_that_fails_half_way_keeps_the_earlier_results(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    cat = _category(ws.example, ws.tmp)
    for image in (cat / "test").rglob("*.png"):  # other pixels than the earlier test, same names
        Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    bad = _truncated(cat / "test" / "good" / "zzz.png", cat / "test" / "good" / "000.png")
    _refused(capsys, ["test", ws.run, cat, "--out", ws.results, "--batch-size", "1"], str(bad), watch=(*ws.all, cat))


def test_test_refuses_a_stray_file_in_test(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    shutil.copy(cat / "test" / "good" / "000.png", cat / "test" / "loose.png")
    _test_refused(capsys, ws, cat, str(cat / "test" / "loose.png"), "unexpected file in test folder")


def test_test_refuses_a_non_image_in_ground_truth(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    (cat / "ground_truth" / "broken_large" / "README").write_text("masks")
    _test_refused(capsys, ws, cat, str(cat / "ground_truth" / "broken_large" / "README"), "not an image file")


def test_test_refuses_a_category_without_test_images(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    shutil.rmtree(cat / "test")
    _test_refused(capsys, ws, cat, str(cat / "test"), "not found")


def test_test_refuses_a_missing_good_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    ghost = ws.tmp / "ghost"
    _refused(capsys, ["test", ws.run, "--good", ghost, "--out", ws.results], str(ghost), "not found", watch=ws.all)


def test_test_refuses_masks_without_defects(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    good = ws.tmp / "good"
    _copy_images(ws.example, good)
    masks = ws.tmp / "masks"
    masks.mkdir()
    _refused(
        capsys,
        ["test", ws.run, "--good", good, "--masks", masks, "--out", ws.results],
        "--masks",
        "--defects",
        watch=ws.all,
    )


def test_test_refuses_defects_without_good(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    defects = ws.tmp / "crack"
    _copy_images(ws.example, defects, 1, "test/broken_large")
    _refused(capsys, ["test", ws.run, "--defects", defects, "--out", ws.results], "--defects", "--good", watch=ws.all)


def test_test_refuses_good_with_data(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    good = ws.tmp / "good"
    _copy_images(ws.example, good)
    _refused(capsys, ["test", ws.run, ws.example, "--good", good, "--out", ws.results], "--good", "DATA", watch=ws.all)


def test_test_refuses_defects_without_masks(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    good, defects = ws.tmp / "good", ws.tmp / "crack"
    _copy_images(ws.example, good)
    images = _copy_images(ws.example, defects, 1, "test/broken_large")
    _refused(
        capsys,
        ["test", ws.run, "--good", good, "--defects", defects, "--out", ws.results],
        str(images[0]),
        "--image-level-only",
        watch=ws.all,
    )


def test_test_refuses_a_run_whose_data_is_gone(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads((ws.run / CONFIG_FILE).read_text())
    config["run"]["data"] = [str(ws.tmp / "moved")]
    (ws.run / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    _refused(capsys, ["test", ws.run, "--out", ws.results], str(ws.tmp / "moved"), watch=ws.all)


# -- model files -----------------------------------------------------------------------------------
def _edit_config(run: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    path = run / CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def _calibration(**values: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda c: c["calibration"].update(values)


def _deep(config: dict[str, Any]) -> None:
    value: dict[str, Any] = {}
    for _ in range(40):
        value = {"a": value}
    config["fit_info"]["deep"] = value


CONFIG_EDITS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("threshold-nan", _calibration(threshold=math.nan), "calibration.threshold"),
    ("threshold-inf", _calibration(threshold=math.inf), "calibration.threshold"),
    ("threshold-1e308", _calibration(threshold=1e308), "calibration.threshold"),
    ("threshold-0", _calibration(threshold=0.0), "calibration.threshold"),
    ("unknown-key", lambda c: c.update(hook="os.system"), "hook: unknown key"),
    ("backbone-bogus", lambda c: c["params"].update(backbone="bogus_net"), "params.backbone"),
    ("format-version-string", lambda c: c.update(format_version="1"), "format_version"),
    ("deep-nesting", _deep, "nested deeper than 32"),
    ("method-unknown", lambda c: c.update(method="magic"), "unknown method"),
    ("image-size-odd", lambda c: c["params"].update(image_size=33), "image_size"),
]


@pytest.mark.parametrize("edit, needle", [c[1:] for c in CONFIG_EDITS], ids=[c[0] for c in CONFIG_EDITS])
def test_predict_refuses_an_edited_config(
    ws: Workspace, capsys: pytest.CaptureFixture[str], edit: Callable[[dict[str, Any]], Any], needle: str
) -> None:
    _edit_config(ws.run, edit)
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    _refused(
        capsys, ["predict", ws.run, image, "--out", ws.predictions], str(ws.run / CONFIG_FILE), needle, watch=ws.all
    )


def test_test_refuses_an_edited_config(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    _edit_config(ws.run, _calibration(threshold=math.nan))
    _refused(
        capsys, ["test", ws.run, "--out", ws.results], str(ws.run / CONFIG_FILE), "calibration.threshold", watch=ws.all
    )


def _predict_refuses_the_tensors(ws: Workspace, capsys: pytest.CaptureFixture[str], problem: str) -> None:
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    _refused(
        capsys, ["predict", ws.run, image, "--out", ws.predictions], str(ws.run / TENSORS_FILE), problem, watch=ws.all
    )


def _rehash(run: Path) -> None:
    _edit_config(run, lambda c: c.update(tensors_sha256=sha256_file(run / TENSORS_FILE)))


def test_predict_refuses_truncated_tensors_with_a_matching_hash(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    _truncated(ws.run / TENSORS_FILE, ws.run / TENSORS_FILE)
    _rehash(ws.run)
    _predict_refuses_the_tensors(ws, capsys, "cannot be read")


def test_predict_refuses_a_nan_bank_with_a_matching_hash(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = load_file(str(ws.run / TENSORS_FILE))
    tensors["memory_bank"].view(-1)[3] = math.nan
    save_file(tensors, str(ws.run / TENSORS_FILE))
    _rehash(ws.run)
    _predict_refuses_the_tensors(ws, capsys, "NaN or infinite")


def test_predict_refuses_changed_tensors(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray((ws.run / TENSORS_FILE).read_bytes())
    data[-5] ^= 0x10
    (ws.run / TENSORS_FILE).write_bytes(bytes(data))
    _predict_refuses_the_tensors(ws, capsys, "checksum")


def _missing_tensors(run: Path) -> tuple[Path, str]:
    (run / TENSORS_FILE).unlink()
    return run / TENSORS_FILE, "missing"


def _tensors_folder(run: Path) -> tuple[Path, str]:
    (run / TENSORS_FILE).unlink()
    (run / TENSORS_FILE).mkdir()
    return run / TENSORS_FILE, TENSORS_FILE


def _empty_config(run: Path) -> tuple[Path, str]:
    (run / CONFIG_FILE).write_bytes(b"")
    return run / CONFIG_FILE, "not valid JSON"


def _config_fifo(run: Path) -> tuple[Path, str]:
    (run / CONFIG_FILE).unlink()
    os.mkfifo(run / CONFIG_FILE)
    return run / CONFIG_FILE, CONFIG_FILE


def _no_config(run: Path) -> tuple[Path, str]:
    (run / CONFIG_FILE).unlink()
    return run / CONFIG_FILE, "missing"


def _run_is_a_file(run: Path) -> tuple[Path, str]:
    shutil.rmtree(run)
    run.write_text("not a run")
    return run, "no such model folder"


MODEL_FOLDERS = [_missing_tensors, _tensors_folder, _empty_config, _config_fifo, _no_config, _run_is_a_file]


@pytest.mark.parametrize("damage", MODEL_FOLDERS, ids=[f.__name__.strip("_") for f in MODEL_FOLDERS])
def test_predict_refuses_a_damaged_model_folder(
    ws: Workspace, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], tuple[Path, str]]
) -> None:
    bad, needle = damage(ws.run)
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    _refused(capsys, ["predict", ws.run, image, "--out", ws.predictions], str(bad), needle, watch=ws.all)


def test_predict_refuses_a_dataset_given_as_the_run(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    _refused(
        capsys,
        ["predict", ws.example, image, "--out", ws.predictions],
        str(ws.example / CONFIG_FILE),
        "missing",
        watch=(*ws.all, ws.example),
    )


# -- outputs ---------------------------------------------------------------------------------------
def _users_folder(tmp: Path) -> Path:
    folder = tmp / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my own notes")
    (folder / "config.json").write_text('{"mine": true}')
    return folder


def test_fit_refuses_a_folder_of_the_users_files(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    mine = _users_folder(ws.tmp)
    _refused(capsys, ["fit", ws.example, "--out", mine, *FIT_ARGS], str(mine), "--overwrite", watch=(mine,))


def test_fit_overwrite_writes_into_the_users_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    mine = _users_folder(ws.tmp)
    (mine / "config.json").unlink()
    notes = (mine / "notes.txt").read_bytes()
    _ok(capsys, ["fit", ws.example, "--out", mine, "--overwrite", *FIT_ARGS])
    assert (mine / "notes.txt").read_bytes() == notes
    assert load(mine).image_size == 64 and (mine / MARKER).is_file()


def test_fit_refuses_to_replace_a_fitted_model(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(
        capsys,
        ["fit", ws.example, "--out", ws.run, *FIT_ARGS],
        str(ws.run),
        "already holds a fitted model",
        watch=ws.all,
    )


def test_fit_refuses_an_output_under_a_regular_file(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = ws.tmp / "blocker"
    blocker.write_text("keep me")
    line = _refused(
        capsys, ["fit", ws.example, "--out", blocker / "run", *FIT_ARGS], str(blocker), "not a folder", watch=(blocker,)
    )
    assert "fitting" not in line


def test_fit_refuses_an_output_that_is_a_regular_file(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = ws.tmp / "blocker"
    blocker.write_text("keep me")
    _refused(
        capsys,
        ["fit", ws.example, "--out", blocker, "--overwrite", *FIT_ARGS],
        str(blocker),
        "not a folder",
        watch=(blocker,),
    )


def test_fit_refuses_its_own_data_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    cat = _category(ws.example, ws.tmp)
    _refused(capsys, ["fit", cat, "--out", cat, *FIT_ARGS], str(cat), "not a defectscope output folder", watch=(cat,))


def test_predict_refuses_to_replace_a_file_that_is_not_predictions(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = ws.out / "report.txt"
    mine.write_text("quarterly figures\n")
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    _refused(
        capsys, ["predict", ws.run, image, "--out", mine], str(mine), "not a defectscope predictions file", watch=ws.all
    )


def test_predict_refuses_to_replace_an_empty_json_list(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    mine = ws.out / "todo.json"
    mine.write_text("[]\n")
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    _refused(
        capsys, ["predict", ws.run, image, "--out", mine], str(mine), "not a defectscope predictions file", watch=ws.all
    )


def test_predict_refuses_to_write_over_an_input_image(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    image = _copy_images(ws.example, ws.tmp / "images", 1)[0]
    _refused(
        capsys,
        ["predict", ws.run, image, "--out", image],
        str(image),
        "not a defectscope predictions file",
        watch=(*ws.all, image.parent),
    )


def test_predict_replaces_an_earlier_predictions_file(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    earlier = ws.predictions.read_bytes()
    images = sorted((ws.example / "test" / "broken_large").iterdir())
    _ok(capsys, ["predict", ws.run, *images, "--out", ws.predictions])
    records = json.loads(ws.predictions.read_text())
    assert ws.predictions.read_bytes() != earlier and [r["path"] for r in records] == [str(p) for p in images]
    assert sorted(p.name for p in ws.out.iterdir()) == ["earlier.json"]  # no temporary file left
    _ok(capsys, ["predict", ws.run, images[0], "--out", ws.predictions, "--format", "csv"])
    assert ws.predictions.read_text().startswith("path,category,score")


def test_predict_refuses_a_folder_as_out(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    _refused(capsys, ["predict", ws.run, image, "--out", ws.out], str(ws.out), "is a folder", watch=ws.all)


def test_predict_refuses_a_missing_parent_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    target = ws.tmp / "no" / "such" / "p.json"
    _refused(
        capsys, ["predict", ws.run, image, "--out", target], str(ws.tmp / "no" / "such"), "no such folder", watch=ws.all
    )
    assert not (ws.tmp / "no").exists()


def test_predict_refuses_heatmaps_into_the_input_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    folder = ws.tmp / "images"
    _copy_images(ws.example, folder)
    _refused(
        capsys,
        ["predict", ws.run, folder, "--heatmaps", folder, "--out", ws.predictions],
        str(folder),
        "not a defectscope output folder",
        watch=(*ws.all, folder),
    )


def test_predict_refuses_heatmaps_onto_a_file(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    _refused(
        capsys,
        ["predict", ws.run, image, "--heatmaps", ws.predictions],
        str(ws.predictions),
        "not a folder",
        watch=ws.all,
    )


def test_test_refuses_a_foreign_non_empty_folder(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    mine = _users_folder(ws.tmp)
    _refused(
        capsys, ["test", ws.run, "--out", mine], str(mine), "not a defectscope output folder", watch=(*ws.all, mine)
    )


def test_test_refuses_an_out_that_is_a_file(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(capsys, ["test", ws.run, "--out", ws.predictions], str(ws.predictions), "not a folder", watch=ws.all)


def test_synth_refuses_a_non_empty_output(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    out = ws.tmp / "synth"
    (out / "test" / "perlin").mkdir(parents=True)
    (out / "test" / "perlin" / "000.png").write_bytes(b"mine")
    _refused(
        capsys,
        ["synth", ws.example, "--kind", "perlin", "--count", "1", "--out", out],
        str(out / "test" / "perlin"),
        "not empty",
        watch=(out,),
    )


# -- faults that need their own process: full disk, no permission ---------------------------------
_FAULT_SCRIPT = r"""
import os, resource, signal, sys
from defectscope.cli import main
import defectscope.backbones, defectscope.nn, faiss, safetensors.torch  # before privileges are dropped
how, limit, *argv = sys.argv[1:]
if how == "nobody":
    os.setgid(65534)
    os.setuid(65534)
else:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
sys.exit(main(argv))
"""


def _in_subprocess(how: str, argv: list[Any], limit: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEFECTSCOPE_NO_PROGRESS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", _FAULT_SCRIPT, how, str(limit), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def _refused_in_subprocess(how: str, argv: list[Any], *needles: str, watch: tuple[Path, ...], limit: int = 0) -> str:
    before = _snapshot(*watch)
    done = _in_subprocess(how, argv, limit)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = _stderr_lines(done.stderr)
    errors = [line for line in lines if line.startswith(ERROR)]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert done.stdout == ""
    assert _snapshot(*watch) == before
    return done.stderr


def test_full_disk_during_predict_out_keeps_the_earlier_file(ws: Workspace) -> None:
    _refused_in_subprocess(
        "limit",
        ["predict", ws.run, ws.example / "test" / "good", "--out", ws.predictions],
        str(ws.predictions),
        "cannot write",
        watch=ws.all,
        limit=1500,
    )


def test_full_disk_during_heatmaps_keeps_the_earlier_files(ws: Workspace) -> None:
    _refused_in_subprocess(
        "limit",
        ["predict", ws.run, ws.example / "test" / "good", "--out", ws.predictions, "--heatmaps", ws.tmp / "h"],
        str(ws.tmp / "h"),
        "cannot write",
        watch=ws.all,
        limit=1500,
    )


def test_full_disk_during_calibrate_keeps_the_model(ws: Workspace) -> None:
    limit = (ws.run / "config.json").stat().st_size // 2  # the new config.json cannot be written in full
    _refused_in_subprocess(
        "limit",
        ["calibrate", ws.run, "--false-alarm-rate", "0.3"],
        str(ws.run),
        "cannot write",
        watch=ws.all,
        limit=limit,
    )


@pytest.mark.parametrize("overlays", [True, False], ids=["overlays", "no-overlays"])
def test_full_disk_during_test_keeps_the_earlier_results(ws: Workspace, overlays: bool) -> None:
    # A file-size limit under which the (small) metrics.json would fit, predictions.csv, report.html
    # and the overlays would not.
    small, large = ((ws.results / name).stat().st_size for name in ("metrics.json", "predictions.csv"))
    limit = (small + large) // 2
    assert small < limit < large
    _refused_in_subprocess(
        "limit",
        ["test", ws.run, "--out", ws.results, *([] if overlays else ["--no-overlays"])],
        str(ws.results),
        "cannot write",
        watch=ws.all,
        limit=limit,
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder an unprivileged user can reach (pytest's own is private to root)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("permission faults are simulated by dropping root privileges; not running as root")
    outer = Path(tempfile.mkdtemp(prefix="defectscope-hostile-"))
    os.chmod(outer, 0o755)
    try:
        yield outer
    finally:
        shutil.rmtree(outer)


def test_fit_into_a_read_only_folder_is_refused_before_fitting(
    ws: Workspace, shared_tmp: Path, unprivileged_ok: bool
) -> None:
    if not unprivileged_ok:
        pytest.skip("the example data or the virtualenv is not readable by an unprivileged user")
    err = _refused_in_subprocess(
        "nobody",
        ["fit", ws.example, "--out", shared_tmp / "run", *FIT_ARGS],
        str(shared_tmp / "run"),
        "permission denied",
        watch=(shared_tmp,),
    )
    assert "fitting" not in err  # checked before any work


def test_fit_over_a_read_only_run_keeps_the_earlier_model(
    ws: Workspace, shared_tmp: Path, unprivileged_ok: bool
) -> None:
    if not unprivileged_ok:
        pytest.skip("the example data or the virtualenv is not readable by an unprivileged user")
    run = Path(shutil.copytree(ws.run, shared_tmp / "run"))
    os.chmod(run, 0o755)
    err = _refused_in_subprocess(
        "nobody",
        ["fit", ws.example, "--out", run, "--overwrite", *FIT_ARGS],
        str(run),
        "permission denied",
        watch=(shared_tmp,),
    )
    assert "fitting" not in err


def test_predict_out_into_a_read_only_folder(ws: Workspace, shared_tmp: Path, unprivileged_ok: bool) -> None:
    if not unprivileged_ok:
        pytest.skip("the example data or the virtualenv is not readable by an unprivileged user")
    run = Path(shutil.copytree(ws.run, shared_tmp / "run"))
    os.chmod(run, 0o755)
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    _refused_in_subprocess(
        "nobody",
        ["predict", run, image, "--out", shared_tmp / "p.json"],
        str(shared_tmp),
        "permission denied",
        watch=(shared_tmp,),
    )


# -- arguments -------------------------------------------------------------------------------------
ARGUMENTS: list[tuple[str, list[str], str]] = [
    ("predict-batch-size-0", ["predict", "{run}", "{image}", "--batch-size", "0"], "--batch-size"),
    ("test-batch-size-minus-1", ["test", "{run}", "--out", "{results}", "--batch-size", "-1"], "--batch-size"),
    ("predict-batch-size-abc", ["predict", "{run}", "{image}", "--batch-size", "abc"], "'abc'"),
    ("coreset-ratio-nan", ["fit", "{example}", "--out", "{new}", "--coreset-ratio", "nan"], "coreset_ratio"),
    ("coreset-ratio-0", ["fit", "{example}", "--out", "{new}", "--coreset-ratio", "0"], "coreset_ratio"),
    ("coreset-ratio-2", ["fit", "{example}", "--out", "{new}", "--coreset-ratio", "2"], "coreset_ratio"),
    ("blur-sigma-nan", ["fit", "{example}", "--out", "{new}", "--set", "blur_sigma=NaN"], "blur_sigma"),
    ("image-size-33", ["fit", "{example}", "--out", "{new}", "--set", "image_size=33"], "image_size"),
    ("image-size-0", ["fit", "{example}", "--out", "{new}", "--image-size", "0"], "image_size"),
    ("image-size-abc", ["fit", "{example}", "--out", "{new}", "--image-size", "abc"], "image_size"),
    ("set-bogus", ["fit", "{example}", "--out", "{new}", "--set", "bogus=1"], "'bogus'"),
    ("set-layers-empty", ["fit", "{example}", "--out", "{new}", "--set", "layers="], "layers"),
    ("set-layers-unknown", ["fit", "{example}", "--out", "{new}", "--set", "layers=s7"], "s7"),
    ("set-without-value", ["fit", "{example}", "--out", "{new}", "--set", "blur_sigma"], "KEY=VALUE"),
    ("set-seed-negative", ["fit", "{example}", "--out", "{new}", "--set", "seed=-1"], "seed"),
    ("backbone-unknown", ["fit", "{example}", "--out", "{new}", "--backbone", "vgg99"], "vgg99"),
    ("weights-missing", ["fit", "{example}", "--out", "{new}", "--weights", "{tmp}/w.pth"], "w.pth"),
    ("epochs-0", ["fit", "{example}", "--out", "{new}", "--method", "draem", "--epochs", "0"], "epochs"),
    ("epochs-patchcore", ["fit", "{example}", "--out", "{new}", "--epochs", "3"], "'epochs'"),
    (
        "time-budget-negative",
        ["fit", "{example}", "--out", "{new}", "--method", "draem", "--time-budget", "-5"],
        "time_budget",
    ),
    ("labelled-defects-0", ["fit", "{example}", "--out", "{new}", "--labelled-defects", "0"], "--labelled-defects"),
    (
        "recall-rule-without-defects",
        ["fit", "{example}", "--out", "{new}", "--target-recall", "0.9"],
        "needs at least 9 held-out labelled defects, got 0",
    ),
    (
        "two-rule-settings",
        ["fit", "{example}", "--out", "{new}", "--target-recall", "0.9", "--false-alarm-rate", "0.1"],
        "each rule has its own setting",
    ),
    ("false-alarm-rate-1", ["fit", "{example}", "--out", "{new}", "--false-alarm-rate", "1"], "false_alarm_rate"),
    ("calibrate-nothing", ["calibrate", "{run}"], "nothing to change"),
    (
        "calibrate-training-images",
        ["calibrate", "{run}", "--good", "{example}/train/good"],
        "already part of this model",
    ),
    ("calibrate-rate-0", ["calibrate", "{run}", "--false-alarm-rate", "0"], "must be between 0 and 1"),
    ("calibrate-rate-nan", ["calibrate", "{run}", "--false-alarm-rate", "nan"], "finite number"),
    ("calibrate-sigmas-11", ["calibrate", "{run}", "--sigmas", "11"], "must be in [0, 10]"),
    (
        "calibrate-mixed-rule",
        ["calibrate", "{run}", "--rule", "mean_sigma", "--false-alarm-rate", "0.1"],
        "each rule has its own setting",
    ),
    ("calibrate-recall-no-defects", ["calibrate", "{run}", "--target-recall", "0.9"], "--defects DIR"),
    ("calibrate-not-a-run", ["calibrate", "{tmp}", "--false-alarm-rate", "0.1"], "config.json"),
    ("calibrate-missing-good", ["calibrate", "{run}", "--good", "{tmp}/nowhere"], "nowhere"),
    ("resume-patchcore", ["fit", "{example}", "--out", "{new}", "--resume"], "--resume"),
    ("method-nope", ["fit", "{example}", "--out", "{new}", "--method", "nope"], "'nope'"),
    ("device-nope", ["fit", "{example}", "--out", "{new}", "--device", "nope"], "nope"),
    ("predict-device-nope", ["predict", "{run}", "{image}", "--device", "nope"], "nope"),
    ("format-xml", ["predict", "{run}", "{image}", "--format", "xml"], "'xml'"),
    ("synth-count-0", ["synth", "{example}", "--kind", "perlin", "--count", "0", "--out", "{new}"], "--count"),
    ("synth-kind-nope", ["synth", "{example}", "--kind", "nope", "--count", "1", "--out", "{new}"], "--kind"),
    (
        "synth-image-size-0",
        ["synth", "{example}", "--kind", "cutpaste", "--count", "1", "--out", "{new}", "--image-size", "0"],
        "--image-size",
    ),
    ("fit-without-out", ["fit", "{example}"], "--out"),
    (
        "threshold-sigmas-huge",
        ["fit", "{example}", "--out", "{new}", "--set", "threshold_sigmas=1e308"],
        "threshold_sigmas",
    ),
    (
        "threshold-sigmas-negative",
        ["fit", "{example}", "--out", "{new}", "--set", "threshold_sigmas=-1"],
        "threshold_sigmas",
    ),
    ("num-neighbors-0", ["fit", "{example}", "--out", "{new}", "--set", "num_neighbors=0"], "num_neighbors"),
    ("neighbourhood-even", ["fit", "{example}", "--out", "{new}", "--set", "neighbourhood=2"], "neighbourhood"),
    ("set-newline", ["fit", "{example}", "--out", "{new}", "--set", "bo\ngus=1"], "bo\\ngus"),
    ("test-categories-without-data", ["test", "{run}", "--out", "{results}", "--categories", "nope"], "--categories"),
]


@pytest.mark.parametrize("argv, needle", [a[1:] for a in ARGUMENTS], ids=[a[0] for a in ARGUMENTS])
def test_bad_arguments_are_refused(
    ws: Workspace, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    image = sorted((ws.example / "test" / "good").iterdir())[0]
    values = {
        "run": ws.run,
        "image": image,
        "results": ws.results,
        "example": ws.example,
        "new": ws.tmp / "new",
        "tmp": ws.tmp,
    }
    _refused(capsys, [a.format(**values) for a in argv], needle, watch=ws.all)
    if "--weights" not in argv:  # weights are found when the fitting starts, after --out is checked
        assert not (ws.tmp / "new").exists()  # refused before anything was written


# -- verdicts and names ----------------------------------------------------------------------------
def test_same_file_names_get_distinct_heatmaps(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    good = sorted((ws.example / "test" / "good").iterdir())[0]
    bad = sorted((ws.example / "test" / "broken_large").iterdir())[0]
    for folder, source in (("a", good), ("b", bad)):
        (ws.tmp / folder).mkdir()
        shutil.copy(source, ws.tmp / folder / "part.png")
    out, _ = _ok(capsys, ["predict", ws.run, ws.tmp / "a", ws.tmp / "b", "--heatmaps", ws.tmp / "h"])
    overlays = [r["overlay"] for r in json.loads(out)]
    assert len(set(overlays)) == 2 and all(Path(o).parent == ws.tmp / "h" for o in overlays)
    assert Path(overlays[0]).read_bytes() != Path(overlays[1]).read_bytes()
    # An earlier heat-map folder is ours: a second run may write into it.
    _ok(capsys, ["predict", ws.run, ws.tmp / "a", "--heatmaps", ws.tmp / "h"])


def _nan_bank(monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
    def damaged(folder: Path) -> Any:
        detector = load(folder)
        detector._index.bank[:] = float("nan")
        return detector

    monkeypatch.setattr(module, "load", damaged)


def test_nan_score_is_an_error_verdict_and_exit_3(
    ws: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import defectscope.runs.info as loading  # where every run loads its model

    _nan_bank(monkeypatch, loading)
    before = _snapshot(ws.run, ws.results)
    images = sorted((ws.example / "test" / "good").iterdir())[:2]
    _, err = _ok(capsys, ["predict", ws.run, *images, "--out", ws.predictions], status=3)
    records = json.loads(ws.predictions.read_text())
    assert [r["verdict"] for r in records] == ["error", "error"] and all(r["reason"] for r in records)
    assert [line for line in _stderr_lines(err) if "verdict error" in line] == [_stderr_lines(err)[-1]]
    assert _snapshot(ws.run, ws.results) == before


def test_nan_score_in_test_is_exit_3(
    ws: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import defectscope.runs.info as loading  # where every run loads its model

    _nan_bank(monkeypatch, loading)
    before = _snapshot(ws.run, ws.out)
    _, err = _ok(capsys, ["test", ws.run, "--out", ws.results, "--no-overlays"], status=3)
    assert json.loads((ws.results / "metrics.json").read_text())["n_errors"] > 0
    assert "verdict error" in _stderr_lines(err)[-1]
    assert _snapshot(ws.run, ws.out) == before


def test_interrupt_keeps_the_earlier_predictions(
    ws: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import defectscope.runs.info as loading  # where every run loads its model

    def interrupted(folder: Path) -> Any:
        detector = load(folder)

        def predict(*args: Any, **kwargs: Any) -> Any:
            raise KeyboardInterrupt

        detector.predict = predict
        return detector

    monkeypatch.setattr(loading, "load", interrupted)
    before = _snapshot(*ws.all)
    capsys.readouterr()
    code = main(["predict", str(ws.run), str(ws.example / "test" / "good"), "--out", str(ws.predictions)])
    out, err = capsys.readouterr()
    assert code == 130 and out == "" and _stderr_lines(err) == ["defectscope: interrupted"], err
    assert _snapshot(*ws.all) == before
