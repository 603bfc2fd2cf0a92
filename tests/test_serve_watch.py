"""``defectscope watch``: files written in parts are taken once complete, judged like ``predict``, logged, sorted.

The model is the service tests' small PatchCore on the bundled example (64 px, a few seconds to fit);
the log is the real SQLite :class:`InspectionLog`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from defectscope import cli
from defectscope.serve.registry import ServedModel
from defectscope.serve.store import InspectionLog
from defectscope.serve.watch import DropFolder, FolderWatcher, WatchEvent, is_temporary, move_into

Main = Callable[[list[str]], int]


@pytest.fixture(scope="module")
def run64(serve_run: Path) -> Path:
    """The service tests' small run (PatchCore, mobilenet_v2, 64 px, fitted once per session)."""
    return serve_run


@pytest.fixture(scope="module")
def model(run64: Path) -> ServedModel:
    return ServedModel.load(run64)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[InspectionLog]:
    data = tmp_path / "data"
    log = InspectionLog(f"sqlite:///{data / 'log.db'}", data)
    yield log
    log.close()


def _images(example_root: Path) -> list[Path]:
    """Two good and two defective test images of the example."""
    test = example_root / "test"
    return [*sorted((test / "good").iterdir())[:2], *sorted((test / "broken_large").iterdir())[:2]]


def _write_part(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` as a camera writes a file: in pieces, with time between them."""
    with open(path, "ab") as handle:
        handle.write(data)


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> Main:
    """The ``defectscope`` entry point, without progress bars."""
    monkeypatch.setenv("DEFECTSCOPE_NO_PROGRESS", "1")
    return cli.main


def _predict_cli(main: Main, run: Path, paths: list[Path], capsys: pytest.CaptureFixture[str]) -> dict[Path, dict]:
    """``defectscope predict`` records by path."""
    assert main(["predict", str(run), *map(str, paths)]) == 0
    return {Path(r["path"]): r for r in json.loads(capsys.readouterr().out)}


# -- when a file is complete ------------------------------------------------------------------------
def test_drop_folder_takes_a_file_once_stable_across_two_polls(tmp_path: Path) -> None:
    now = [0.0]
    drop = DropFolder(tmp_path, empty_grace_s=5.0, clock=lambda: now[0])
    image = tmp_path / "000.png"
    _write_part(image, b"first half")
    assert drop.poll() == [] and drop.n_pending == 1  # seen once
    _write_part(image, b" second half")
    assert drop.poll() == []  # grew since the last poll: still being written
    (ready,) = drop.poll()  # the same size and time at two polls in a row
    assert ready[0] == image and ready[1].size == len(b"first half second half")
    drop.handled(image, ready[1])
    assert drop.poll() == [] and drop.n_pending == 0  # handled and unchanged: not taken again
    os.utime(image, ns=(1, 1))  # replaced under the same name: new
    assert drop.poll() == [] and [p for p, _ in drop.poll()] == [image]


def test_drop_folder_ignores_temporary_names_and_folders_and_waits_for_empty_files(tmp_path: Path) -> None:
    now = [0.0]
    drop = DropFolder(tmp_path, empty_grace_s=5.0, clock=lambda: now[0])
    for name in (".000.png", "001.png.tmp", "002.PART", "Thumbs.db", "._003.png"):
        (tmp_path / name).write_bytes(b"being written")
    (tmp_path / "good").mkdir()
    (tmp_path / "empty.png").touch()
    assert all(is_temporary(n) for n in (".000.png", "001.png.tmp", "002.PART", "Thumbs.db"))
    assert not is_temporary("004.png")
    assert drop.poll() == [] and drop.poll() == []  # an empty file waits for its grace period
    now[0] = 6.0
    assert [p.name for p, _ in drop.poll()] == ["empty.png"]
    (tmp_path / "001.png.tmp").rename(tmp_path / "001.png")  # renamed in when complete
    assert drop.poll() == [] and [p.name for p, _ in drop.poll()] == ["001.png"]


def test_move_into_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "000.png").write_bytes(b"the operator's file")
    (tmp_path / "good" / "000-1.png").write_bytes(b"another")
    (tmp_path / "000.png").write_bytes(b"new")
    target = move_into(tmp_path / "000.png", tmp_path / "good")
    assert target == tmp_path / "good" / "000-2.png" and target.read_bytes() == b"new"
    assert (tmp_path / "good" / "000.png").read_bytes() == b"the operator's file"
    assert not (tmp_path / "000.png").exists()


# -- judged, logged, sorted -------------------------------------------------------------------------
def test_watcher_judges_files_written_in_parts_logs_and_sorts_them_like_predict(
    model: ServedModel,
    run64: Path,
    log: InspectionLog,
    example_root: Path,
    tmp_path: Path,
    main: Main,
    capsys: pytest.CaptureFixture[str],
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "good").mkdir()
    (drop / "good" / "000.png").write_bytes(b"already there: must survive")  # a name clash in good/
    watcher = FolderWatcher(model, log, drop, sort=True)
    sources = _images(example_root)
    names = [f"{p.parent.name}_{p.name}" for p in sources]
    names[0] = "000.png"
    halves = [(p.read_bytes()[:5000], p.read_bytes()[5000:]) for p in sources]
    for name, (first, _) in zip(names, halves):
        _write_part(drop / name, first)
    assert watcher.step() == []  # first sight
    for name, (_, second) in zip(names, halves):
        _write_part(drop / name, second)
    assert watcher.step() == []  # changed since: still being written, never judged half
    events: list[WatchEvent] = watcher.step()
    assert [e.path.name for e in events] == sorted(names)
    assert all(e.problem is None and e.inspection is not None for e in events)

    expected = _predict_cli(main, run64, sources, capsys)
    for event in events:
        row = event.inspection
        assert row is not None
        source = sources[names.index(event.path.name)]
        want = expected[source]
        assert row.score == pytest.approx(want["score"], rel=1e-5, abs=1e-6)
        assert row.verdict == want["verdict"] and row.threshold == pytest.approx(want["threshold"])
        assert row.max_pixel_score == pytest.approx(want["max_pixel_score"], rel=1e-5, abs=1e-6)
        assert row.model == model.name and row.model_sha256 == model.sha256 and row.filename == event.path.name
        stored = log.get(row.id)
        assert stored is not None and stored.score == row.score and stored.verdict == row.verdict
        assert log.file_path(stored.image).read_bytes() == source.read_bytes()
        assert stored.map is not None and log.file_path(stored.map).is_file()
        assert event.moved_to is not None and event.moved_to.parent == drop / str(row.verdict)
        assert event.moved_to.read_bytes() == source.read_bytes() and not event.path.exists()
    verdicts = {e.inspection.verdict for e in events if e.inspection}
    assert verdicts == {"good", "anomalous"}
    assert (drop / "good" / "000.png").read_bytes() == b"already there: must survive"
    assert (drop / "good" / "000-1.png").read_bytes() == sources[0].read_bytes()
    assert log.list(model=model.name)[1] == len(sources)
    assert watcher.step() == []  # nothing left, nothing judged twice


def test_hostile_files_go_to_error_with_the_cli_message_and_the_watcher_keeps_going(
    model: ServedModel,
    run64: Path,
    log: InspectionLog,
    example_root: Path,
    tmp_path: Path,
    main: Main,
    capsys: pytest.CaptureFixture[str],
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    good = sorted((example_root / "test" / "good").iterdir())[0]
    (drop / "a_garbage.png").write_bytes(os.urandom(3000))
    (drop / "b_truncated.png").write_bytes(good.read_bytes()[:3000])
    (drop / "c_notes.txt").write_text("operator notes")
    (drop / "d_empty.png").touch()
    os.mkfifo(drop / "e_fifo.png")
    (drop / "f_link.png").symlink_to(good)
    shutil.copy(good, drop / "z_good.png")
    cli_messages = {}
    for name in ("a_garbage.png", "b_truncated.png", "c_notes.txt", "d_empty.png", "e_fifo.png"):
        assert main(["predict", str(run64), str(drop / name)]) == 2
        cli_messages[name] = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("defectscope: error: ")

    dropped = sorted(p.name for p in drop.iterdir())
    watcher = FolderWatcher(model, log, drop, sort=True, empty_grace_s=0.0)
    assert watcher.step() == []
    events = {e.path.name: e for e in watcher.step()}
    assert sorted(events) == dropped
    for name, message in cli_messages.items():
        assert events[name].inspection is None and events[name].problem == message, name
        assert "\n" not in message and str(drop / name) in message
    assert "symbolic link" in (events["f_link.png"].problem or "")
    assert {p.name for p in (drop / "error").iterdir()} == {*cli_messages, "f_link.png"}
    assert events["z_good.png"].inspection is not None and events["z_good.png"].inspection.verdict == "good"
    assert (drop / "good" / "z_good.png").is_file()
    assert log.list()[1] == 1  # only the image that could be judged is logged
    assert good.is_file()  # the symlink moved, not its target


def test_watch_cli_once_prints_one_line_per_image_and_leaves_files_without_sort(
    run64: Path, example_root: Path, tmp_path: Path, main: Main, capsys: pytest.CaptureFixture[str]
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    sources = _images(example_root)
    for i, source in enumerate(sources):
        shutil.copy(source, drop / f"{i:03d}.png")
    (drop / "bad.png").write_bytes(b"not an image")
    argv = ["watch", str(run64), str(drop), "--once", "--interval", "0.05", "--data-dir", str(tmp_path / "data")]
    assert main(argv) == 3  # some file could not be used
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == len(sources)
    expected = {p.name: r for p, r in _predict_cli(main, run64, sorted(drop.glob("0*.png")), capsys).items()}
    for line in lines:
        verdict, score, name, ident = line.split()
        assert verdict == expected[name]["verdict"] and float(score) == pytest.approx(expected[name]["score"], abs=1e-4)
        assert ident.startswith("id=") and len(ident) == 3 + 32
    assert f"{drop / 'bad.png'}: not a readable image" in err and "4 image(s) inspected" in err
    assert sorted(p.name for p in drop.iterdir()) == ["000.png", "001.png", "002.png", "003.png", "bad.png"]
    assert (tmp_path / "data").is_dir()
    assert main([*argv, "--sort"]) == 3  # the same log, now sorted
    capsys.readouterr()
    assert sorted(p.name for p in drop.iterdir() if p.is_file()) == []
    assert len(list((drop / "error").iterdir())) == 1


def test_watch_cli_refuses_sort_without_threshold_and_a_missing_folder(
    run64: Path, tmp_path: Path, main: Main, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["watch", str(run64), str(tmp_path / "nope"), "--once", "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'nope'}: folder not found" in err
    assert main(["watch", str(run64), str(tmp_path), "--interval", "0"]) == 2
    assert "more than 0" in capsys.readouterr().err


def test_ctrl_c_stops_the_watcher_cleanly_with_status_130(run64: Path, example_root: Path, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    argv = ["watch", str(run64), str(drop), "--interval", "0.1", "--data-dir", str(tmp_path / "data"), "--sort"]
    env = {**os.environ, "DEFECTSCOPE_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "defectscope.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        shutil.copy(sorted((example_root / "test" / "good").iterdir())[0], drop / "000.png.part")
        (drop / "000.png.part").rename(drop / "000.png")
        deadline = time.monotonic() + 60
        while not (drop / "good" / "000.png").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (drop / "good" / "000.png").exists()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert out.startswith("good") and "000.png -> good/000.png" in out
    assert "interrupted" in err and "Traceback" not in err


def test_once_leaves_a_file_that_never_settles_and_says_so(
    model: ServedModel, log: InspectionLog, example_root: Path, tmp_path: Path
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(sorted((example_root / "test" / "good").iterdir())[0], drop / "000.png")
    growing = drop / "growing.png"
    done = threading.Event()

    def camera() -> None:  # a writer that never finishes (until the test ends)
        while not done.is_set():
            _write_part(growing, b"x" * 100)
            time.sleep(0.01)

    writer = threading.Thread(target=camera, daemon=True)
    writer.start()
    events: list[WatchEvent] = []
    try:
        watcher = FolderWatcher(model, log, drop, sort=True)
        counts = watcher.run(events.append, interval=0.05, once=True, once_wait_s=1.0)
    finally:
        done.set()
        writer.join()
    assert [e.path.name for e in events] == ["000.png", "growing.png"]
    assert events[0].moved_to == drop / "good" / "000.png"
    assert events[1].problem == f"{growing}: still being written after 1 s; left as it is"
    assert events[1].moved_to is None and growing.is_file()
    assert counts.inspected == 1 and counts.refused == 1


def test_a_model_without_threshold_logs_no_verdict_and_cannot_sort(
    example_root: Path, tmp_path: Path, main: Main, capsys: pytest.CaptureFixture[str]
) -> None:
    from defectscope.runs import fit_run

    run = tmp_path / "uncalibrated"
    fit_run(example_root, run, params={"backbone": "mobilenet_v2", "image_size": 64, "calibration_fraction": 0.0})
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(sorted((example_root / "test" / "good").iterdir())[0], drop / "000.png")
    argv = ["watch", str(run), str(drop), "--once", "--interval", "0.05", "--data-dir", str(tmp_path / "data")]
    assert main([*argv, "--sort"]) == 2
    err = capsys.readouterr().err
    assert "no calibrated threshold" in err and err.count("\n") == 1 and not (tmp_path / "data").exists()
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("none ") and "000.png" in line
    with InspectionLog(None, tmp_path / "data") as log:
        (row,), total = log.list()
    assert total == 1 and row.verdict == "none" and row.threshold is None and row.score is not None
