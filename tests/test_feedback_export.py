"""``defectscope feedback export``: the operator's feedback in MVTec layout, read back by what fit and
calibrate read (``pick_labelled_defects``, ``labelled_samples``, ``image_files``), and by a real fit
and calibrate."""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.data.image_io import load_mask, read_image
from defectscope.data.layouts import image_files
from defectscope.data.sources import labelled_samples, pick_labelled_defects
from defectscope.errors import DefectscopeError, OutputError
from defectscope.outputs import MARKER
from defectscope.serve.export import export_feedback
from defectscope.serve.images import png_bytes
from defectscope.serve.store import Inspection, InspectionIn, InspectionLog
from helpers import DMAD_SMALL

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "bottle_small"


def stroke_mask(size: tuple[int, int] = (64, 64)) -> bytes:
    """What the page sends: white strokes on a transparent canvas, smaller than the image."""
    mask = Image.new("RGBA", size, (255, 255, 255, 0))
    w, h = size
    for x in range(w // 4, w // 2):
        for y in range(h // 4, h // 2):
            mask.putpixel((x, y), (255, 255, 255, 255))
    return png_bytes(mask)


def inspect(log: InspectionLog, image: Path | bytes, model: str = "bottle", suffix: str = ".png") -> Inspection:
    data = image.read_bytes() if isinstance(image, Path) else image
    name = log.store_file(data, suffix)
    row = InspectionIn(model, "ab" * 32, "part.png", name, None, 2.0, 1.3, "anomalous", 1.5, "conformal", 3.0, None, {})
    return log.add_inspection(row)


class Logged:
    """A log holding one inspection per kind of feedback (see ``logged``)."""

    def __init__(self, log: InspectionLog) -> None:
        self.log = log
        test = EXAMPLE / "test"
        self.masked = inspect(log, test / "broken_large" / "000.png")  # confirmed, typed, with a mask
        mask = log.store_file(stroke_mask(), ".png")
        log.add_feedback(self.masked.id, "confirmed_defect", mask=mask, defect_type="broken_large")
        self.missed = inspect(log, test / "contamination" / "000.png")  # missed, untyped, with a mask
        log.add_feedback(self.missed.id, "missed_defect", mask=log.store_file(stroke_mask((300, 300)), ".png"))
        self.unmasked = inspect(log, test / "broken_small" / "000.png")  # a defect without a mask
        log.add_feedback(self.unmasked.id, "confirmed_defect")
        self.blank = inspect(log, test / "broken_small" / "010.png")  # an empty mask: none drawn
        log.add_feedback(
            self.blank.id, "confirmed_defect", mask=log.store_file(png_bytes(Image.new("L", (8, 8))), ".png")
        )
        self.false_alarm = inspect(log, test / "good" / "000.png")
        log.add_feedback(self.false_alarm.id, "false_alarm", note="reflection")
        self.good = inspect(log, test / "good" / "003.png")
        log.add_feedback(self.good.id, "confirmed_good")
        self.cable = inspect(log, test / "good" / "005.png", model="cable")
        log.add_feedback(self.cable.id, "false_alarm")
        self.silent = inspect(log, test / "good" / "008.png")  # no feedback: not exported


@pytest.fixture
def logged(backend: str, tmp_path: Path) -> Iterator[Logged]:
    with InspectionLog(backend, tmp_path / "data") as log:
        yield Logged(log)


def test_export_writes_the_mvtec_layout_and_marks_the_feedback(logged: Logged, tmp_path: Path) -> None:
    log, out = logged.log, tmp_path / "out"
    summaries = export_feedback(log, out)
    assert [(s.model, s.defects, s.defects_without_masks, s.good, s.marked, s.skipped) for s in summaries] == [
        ("bottle", 2, 2, 2, 6, 0),
        ("cable", 0, 0, 1, 1, 0),
    ]
    assert summaries[0].describe().startswith("bottle: 2 defect(s) with masks, 2 without, 2 good -> ")
    bottle = out / "bottle"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    m, s, u, b, f, g, c = (
        logged.masked.id,
        logged.missed.id,
        logged.unmasked.id,
        logged.blank.id,
        logged.false_alarm.id,
        logged.good.id,
        logged.cable.id,
    )
    assert files == sorted(
        [
            MARKER,
            f"bottle/test/broken_large/{m}.png",
            f"bottle/ground_truth/broken_large/{m}_mask.png",
            f"bottle/test/feedback/{s}.png",
            f"bottle/ground_truth/feedback/{s}_mask.png",
            f"bottle/defects_without_masks/feedback/{u}.png",
            f"bottle/defects_without_masks/feedback/{b}.png",
            f"bottle/good/{f}.png",
            f"bottle/good/{g}.png",
            f"cable/good/{c}.png",
        ]
    )
    exported = (bottle / "test" / "broken_large" / f"{m}.png").read_bytes()
    assert exported == log.file_path(logged.masked.image).read_bytes()
    mask = np.asarray(Image.open(bottle / "ground_truth" / "broken_large" / f"{m}_mask.png"))
    assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}
    assert mask[64:128, 64:128].all() and not mask[:64].any() and not mask[128:].any()  # scaled from 64 x 64
    assert log.feedback_counts() == {}
    assert export_feedback(log, out) == []  # nothing waits any more
    again = export_feedback(log, out, everything=True)
    assert [(s.model, s.defects, s.good, s.marked) for s in again] == [("bottle", 2, 2, 0), ("cable", 0, 1, 0)]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files


def test_the_export_is_what_fit_and_calibrate_read(logged: Logged, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_feedback(logged.log, out)
    bottle = out / "bottle"
    for source in (out, bottle):  # the export root (one labelled category in it) or the category itself
        picked = pick_labelled_defects([EXAMPLE], 2, source=source)
        assert sorted(s.path.name for s in picked) == sorted([f"{logged.masked.id}.png", f"{logged.missed.id}.png"])
        assert all(s.category == EXAMPLE.name and s.mask_path is not None for s in picked)
    with pytest.raises(DefectscopeError, match="fewer than the 3 requested"):
        pick_labelled_defects([EXAMPLE], 3, source=out)
    samples = labelled_samples(bottle)
    assert {s.defect_type for s in samples} == {"broken_large", "feedback"} and all(s.label == 1 for s in samples)
    for sample in samples:
        assert sample.mask_path is not None
        assert load_mask(sample.mask_path, read_image(sample.path)[1]).any()
    assert len(image_files([bottle / "good"])) == 2  # calibrate --good
    assert len(image_files([bottle / "defects_without_masks" / "feedback"])) == 2  # calibrate --defects


def test_a_fit_and_a_calibration_learn_from_the_export(tmp_path: Path) -> None:
    """DMAD learns from the exported defects and their masks; calibrate takes the false alarms."""
    from defectscope.runs import calibrate_run, fit_run

    with InspectionLog(None, tmp_path / "data") as log:
        logged = Logged(log)
        out = tmp_path / "out"
        export_feedback(log, out, model="bottle")
    fitted = fit_run(EXAMPLE, tmp_path / "run", method="dmad", params=DMAD_SMALL, labelled_defects=2, defects_from=out)
    assert sorted(Path(p).name for p in fitted.info.labelled_defects) == sorted(
        [f"{logged.masked.id}.png", f"{logged.missed.id}.png"]
    )
    assert fitted.detector.fit_info["anomaly_bank_labelled"] > 0  # patches taken from inside the masks
    result = calibrate_run(
        tmp_path / "run",
        [out / "bottle" / "good"],
        [out / "bottle" / "defects_without_masks" / "feedback"],
    )
    assert result.n_new_good == 2 and result.n_new_defects == 2


def test_an_inspection_exported_again_moves_to_its_latest_feedback(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with InspectionLog(backend, tmp_path / "data") as log:
        part = inspect(log, EXAMPLE / "test" / "broken_large" / "010.png")
        log.add_feedback(part.id, "false_alarm")
        export_feedback(log, out)
        assert (out / "bottle" / "good" / f"{part.id}.png").is_file()
        log.add_feedback(part.id, "confirmed_defect", mask=log.store_file(stroke_mask(), ".png"), defect_type="crack")
        assert log.feedback_counts()["bottle"]["confirmed_defect"] == 1
        [summary] = export_feedback(log, out)
        assert (summary.defects, summary.good, summary.marked) == (1, 0, 1)
    assert not (out / "bottle" / "good" / f"{part.id}.png").exists()
    assert (out / "bottle" / "test" / "crack" / f"{part.id}.png").is_file()
    assert (out / "bottle" / "ground_truth" / "crack" / f"{part.id}_mask.png").is_file()


def test_only_the_latest_feedback_counts(tmp_path: Path) -> None:
    with InspectionLog(None, tmp_path / "data") as log:
        part = inspect(log, EXAMPLE / "test" / "good" / "011.png")
        log.add_feedback(part.id, "confirmed_defect")
        log.add_feedback(part.id, "false_alarm")  # the operator corrected themselves
        [summary] = export_feedback(log, tmp_path / "out")
        assert (summary.defects, summary.defects_without_masks, summary.good, summary.marked) == (0, 0, 1, 2)
        got = log.get(part.id)
        assert got is not None and all(f.exported for f in got.feedback)


def test_a_rotated_jpeg_gets_its_mask_at_the_upright_size(tmp_path: Path) -> None:
    photo = Image.new("RGB", (40, 20), (90, 90, 90))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: upright it is 20 wide, 40 high
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif)
    with InspectionLog(None, tmp_path / "data") as log:
        part = inspect(log, buffer.getvalue(), suffix=".jpg")
        log.add_feedback(part.id, "missed_defect", mask=log.store_file(stroke_mask((10, 20)), ".png"))
        export_feedback(log, tmp_path / "out")
    image = tmp_path / "out" / "bottle" / "test" / "feedback" / f"{part.id}.jpg"
    mask = tmp_path / "out" / "bottle" / "ground_truth" / "feedback" / f"{part.id}_mask.png"
    assert image.read_bytes() == buffer.getvalue()  # the stored input, byte for byte
    assert Image.open(mask).size == (20, 40)
    assert load_mask(mask, read_image(image)[1]).any()
    assert len(labelled_samples(tmp_path / "out" / "bottle")) == 1


def test_a_folder_of_the_users_is_not_written_into(logged: Logged, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = logged.log.feedback_counts()
    with pytest.raises(OutputError, match="not empty and not a defectscope output folder"):
        export_feedback(logged.log, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert logged.log.feedback_counts() == before  # nothing marked
    assert len(export_feedback(logged.log, out, overwrite=True)) == 2


def test_a_lost_image_is_left_out_and_keeps_waiting(tmp_path: Path) -> None:
    with InspectionLog(None, tmp_path / "data") as log:
        lost = inspect(log, b"lost image bytes")
        kept = inspect(log, EXAMPLE / "test" / "good" / "014.png")
        for part in (lost, kept):
            log.add_feedback(part.id, "false_alarm")
        log.file_path(lost.image).unlink()
        [summary] = export_feedback(log, tmp_path / "out")
        assert (summary.good, summary.skipped, summary.marked) == (1, 1, 1)
        assert lost.id in summary.notes[0] and "left out" in summary.notes[0] and "\n" not in summary.notes[0]
        assert log.feedback_counts()["bottle"]["false_alarm"] == 1
        broken = inspect(log, b"not an image at all")  # stored, but no image
        log.add_feedback(broken.id, "false_alarm")
        [summary] = export_feedback(log, tmp_path / "out")
        assert summary.skipped == 2 and any("not a readable image" in n for n in summary.notes)


def test_a_model_name_that_is_no_folder_name_is_refused(tmp_path: Path) -> None:
    with InspectionLog(None, tmp_path / "data") as log:
        for name in ("..", "a/b", ".hidden"):
            part = inspect(log, EXAMPLE / "test" / "good" / "016.png", model=name)
            log.add_feedback(part.id, "false_alarm")
            with pytest.raises(OutputError, match="cannot be a folder of the export"):
                export_feedback(log, tmp_path / "out", model=name)
    assert not (tmp_path / "out").exists() and not (tmp_path / "b").exists()


# ---- the command ---------------------------------------------------------------------------------


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], int]:
    """``defectscope.cli.main`` with the feedback command (registered here until cli/__init__ lists it)."""
    from defectscope import cli
    from defectscope.cli import feedback as cli_feedback

    original = cli.build_parser

    def build() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "feedback" not in sub.choices:
            cli_feedback.add_parser(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    return cli.main


def test_the_command_exports_and_says_what_it_wrote(
    logged: Logged, backend: str, tmp_path: Path, main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    data = ["--data-dir", str(tmp_path / "data")] if backend.startswith("postgresql") else []
    assert main(["feedback", "export", "--db", backend, *data, "--out", str(out), "--model", "cable"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"cable: 0 defect(s) with masks, 0 without, 1 good -> {out / 'cable'} (1 feedback marked exported)"
    ]
    assert main(["feedback", "export", "--db", backend, *data, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bottle: 2 defect(s) with masks, 2 without, 2 good")
    assert main(["feedback", "export", "--db", backend, *data, "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("no feedback waiting to be exported (--all")
    assert main(["feedback", "export", "--db", backend, *data, "--out", str(out), "--all"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_the_command_finds_the_data_folder_or_says_what_is_missing(
    tmp_path: Path, main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    with InspectionLog(None, data) as log:
        part = inspect(log, EXAMPLE / "test" / "good" / "019.png")
        log.add_feedback(part.id, "confirmed_good")
    out = tmp_path / "out"
    assert main(["feedback", "export", "--data-dir", str(data), "--out", str(out), "--model", "nothing"]) == 0
    assert capsys.readouterr().out.startswith("no feedback waiting to be exported for nothing")
    assert main(["feedback", "export", "--db", str(data / "inspections.db"), "--out", str(out)]) == 0  # a path
    assert (out / "bottle" / "good" / f"{part.id}.png").is_file()
    capsys.readouterr()
    failures = [
        (["--out", str(out)], "give --db URL or --data-dir DIR"),
        (["--db", "postgresql://u:pw@127.0.0.1:1/x", "--out", str(out)], "--data-dir DIR is needed"),
        (["--db", f"sqlite:///{tmp_path / 'typo.db'}", "--out", str(out)], "no such inspection log"),
        (["--data-dir", str(tmp_path / "nowhere"), "--out", str(out)], "no such data folder"),
        (["--db", "postgresql://u:pw@127.0.0.1:1/x", "--data-dir", str(data), "--out", str(out)], "u:***@127.0.0.1"),
    ]
    for argv, fragment in failures:
        assert main(["feedback", "export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("defectscope: error: ") and err.count("\n") == 1 and fragment in err, err
        assert ":pw@" not in err
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "nowhere").exists()
