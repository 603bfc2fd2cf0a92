"""The model file format refuses anything it cannot trust, and saving never loses the earlier model.

Every refusal is one line naming the file (and the key), and leaves the folder exactly as it was.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from defectscope import PatchCore, load
from defectscope.checkpoint import (
    CHECKPOINT_JSON,
    CHECKPOINT_TENSORS,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from defectscope.errors import ModelFileError, OutputError
from defectscope.methods.model_file import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    TENSORS_FILE,
    read_json,
)
from defectscope.thresholds import Calibration, calibrate


@pytest.fixture(scope="module")
def base_run(example_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    det = PatchCore(image_size=64, coreset_ratio=0.1).fit(example_root)
    return det.save(tmp_path_factory.mktemp("model") / "bottle")


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def _as_older_format(config: dict[str, Any]) -> None:
    """The config as defectscope wrote it before threshold rules: mean_sigma statistics only."""
    for key in ("threshold_rule", "false_alarm_rate", "target_recall"):
        config["params"].pop(key)
    older = calibrate(config["calibration"]["good_scores"], rule="mean_sigma").to_dict()
    config["calibration"] = {k: older[k] for k in ("threshold", "mean", "std", "max", "n_images", "sigmas", "rule")}


@pytest.fixture
def older_run(run: Path) -> Path:
    """A model in the format saved before threshold rules existed (mean + 3 sd, no stored scores)."""
    _edit_config(run, _as_older_format)
    return run


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _edit_config(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def _refused(folder: Path, *needles: str, error: type[Exception] = ModelFileError) -> str:
    """Load ``folder``, expecting a one-line ``error`` holding every needle, and no change on disk."""
    before = _snapshot(folder)
    with pytest.raises(error) as info:
        load(folder)
    message = str(info.value)
    assert type(info.value) is error
    assert "\n" not in message and len(message) < 600, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert _snapshot(folder) == before
    return message


def _set_calibration(**values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config["calibration"].update(values)

    return edit


def _consistent(mean: float, std: float, top: float, n: int) -> Callable[[dict[str, Any]], None]:
    """Statistics with the threshold recomputed to match them."""
    return _set_calibration(mean=mean, std=std, max=top, n_images=n, threshold=max(mean + 3.0 * std, top))


def _nest(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


CONFIG_CASES: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("extra calibration key", _set_calibration(note=1.0), "calibration.note"),
    ("format_version string", lambda c: c.update(format_version="1"), "format_version"),
    ("format_version bool", lambda c: c.update(format_version=True), "format_version"),
    ("format_version newer", lambda c: c.update(format_version=2), "newer"),
    ("format_version zero", lambda c: c.update(format_version=0), "format_version"),
    ("format_version missing", lambda c: c.pop("format_version"), "format_version"),
    ("unknown top-level key", lambda c: c.update(exec="import os"), "exec: unknown key"),
    ("missing top-level key", lambda c: c.pop("fit_info"), "fit_info"),
    ("fit_info not an object", lambda c: c.update(fit_info=[1, 2]), "fit_info"),
    ("run not an object", lambda c: c.update(run="bottle"), "run"),
    ("tensors_sha256 not a hash", lambda c: c.update(tensors_sha256="abc"), "tensors_sha256"),
    ("unknown method", lambda c: c.update(method="nonsense"), "unknown method"),
    ("method not a string", lambda c: c.update(method=["patchcore"]), "unknown method"),
    ("params unknown key", lambda c: c["params"].update(bogus=1), "params.bogus"),
    ("params missing key", lambda c: c["params"].pop("seed"), "params.seed"),
    ("params wrong type", lambda c: c["params"].update(image_size="64"), "params.image_size"),
    ("params bool for int", lambda c: c["params"].update(image_size=True), "params.image_size"),
    ("params float for int", lambda c: c["params"].update(seed=0.5), "params.seed"),
    ("params nan", lambda c: c["params"].update(blur_sigma=math.nan), "params.blur_sigma"),
    ("params tuple item type", lambda c: c["params"].update(layers=["s8", 16]), "params.layers"),
    ("params not a backbone", lambda c: c["params"].update(backbone="os.system"), "params.backbone"),
    ("params refused by constructor", lambda c: c["params"].update(image_size=40), "image_size"),
    ("params not an object", lambda c: c.update(params=[64]), "params"),
    ("threshold nan", _set_calibration(threshold=math.nan), "calibration.threshold"),
    ("threshold inf", _set_calibration(threshold=math.inf), "calibration.threshold"),
    ("threshold 1e308", _set_calibration(threshold=1e308), "calibration.threshold"),
    ("threshold 0", _set_calibration(threshold=0.0), "calibration.threshold"),
    ("threshold -1", _set_calibration(threshold=-1.0), "calibration.threshold"),
    ("threshold string", _set_calibration(threshold="17"), "calibration.threshold"),
    ("threshold missing", lambda c: c["calibration"].pop("threshold"), "calibration.threshold"),
    ("std missing", lambda c: c["calibration"].pop("std"), "calibration.std"),
    ("calibration not an object", lambda c: c.update(calibration=3.0), "calibration"),
    ("unknown rule", _set_calibration(rule="always_good"), "calibration.rule"),
    ("rule not a string", _set_calibration(rule=["mean_sigma"]), "calibration.rule"),
    ("n_images 0", _set_calibration(n_images=0), "calibration.n_images"),
    ("n_images float", _set_calibration(n_images=3.0), "calibration.n_images"),
    ("std negative", _consistent(1.0, -0.5, 1.0, 3), "calibration.std"),
    ("max below mean", _consistent(2.0, 0.5, 1.0, 3), "calibration.mean"),
    ("max too far above mean", _consistent(1.0, 0.0, 50.0, 3), "calibration.max"),
    ("single image with spread", _consistent(1.0, 0.5, 1.0, 1), "1 image"),
    ("all-zero scores of a non-negative method", _consistent(0.0, 0.0, 0.0, 3), "calibration.threshold"),
    ("negative mean of a non-negative method", _consistent(-5.0, 1.0, -4.0, 3), "calibration.mean"),
    ("stats overflow", _set_calibration(mean=1e308, std=1e308, max=1e308, threshold=1.7e308), "not finite"),
    (
        "sigmas differ from threshold_sigmas",
        lambda c: (c["calibration"].update(sigmas=0.0), c["calibration"].update(threshold=c["calibration"]["max"])),
        "calibration.sigmas",
    ),
    ("backbone weights hash format", lambda c: c.update(backbone_weights_sha256=7), "backbone_weights_sha256"),
    ("backbone weights hash missing", lambda c: c.pop("backbone_weights_sha256"), "backbone_weights_sha256"),
    ("key of another method's kind", lambda c: c.update(unet_config={}), "unet_config"),
]


@pytest.mark.parametrize("edit, needle", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_crafted_config_is_refused(older_run: Path, edit: Callable[[dict[str, Any]], Any], needle: str) -> None:
    _edit_config(older_run, edit)
    _refused(older_run, str(older_run / CONFIG_FILE), needle)


def test_valid_model_loads_with_its_calibration_and_run_record(older_run: Path) -> None:
    run = older_run
    config = json.loads((run / CONFIG_FILE).read_text())
    assert config["calibration"]["rule"] == "mean_sigma"
    assert sorted(p.name for p in run.iterdir()) == [CONFIG_FILE, TENSORS_FILE]
    _edit_config(run, lambda c: c.update(run={"data": ["bottle"], "categories": ["bottle"]}))
    det = load(run)
    assert det.calibration == Calibration.from_dict(config["calibration"], nonnegative_scores=True)
    assert det.calibration.threshold == config["calibration"]["threshold"] > config["calibration"]["max"] > 0
    assert det.run_info == {"data": ["bottle"], "categories": ["bottle"]}


def test_calibration_without_rule_from_the_older_format_loads(older_run: Path) -> None:
    _edit_config(older_run, lambda c: c["calibration"].pop("rule"))
    det = load(older_run)
    assert det.calibration.rule == "mean_sigma" and det.threshold_rule == "mean_sigma"
    cal = det.calibration
    assert cal.good_scores is None and cal.false_alarm_bound == 1 / (cal.n_images + 1)


def test_null_calibration_loads_without_a_threshold(run: Path) -> None:
    _edit_config(run, lambda c: c.update(calibration=None))
    det = load(run)
    assert det.calibration is None
    assert det.predict(torch.rand(1, 3, 64, 64)).threshold is None


def test_changed_backbone_weights_are_refused(run: Path) -> None:
    _edit_config(run, lambda c: c.update(backbone_weights_sha256="0" * 64))
    _refused(run, str(run), "sha256 differs")


def test_deep_nesting_is_refused_before_parsing(run: Path) -> None:
    text = (run / CONFIG_FILE).read_text()
    deep = '{"a": ' * 100_000 + "{}" + "}" * 100_000
    (run / CONFIG_FILE).write_text(text.replace('"fit_info": {', f'"fit_info": {{"deep": {deep},', 1))
    _refused(run, str(run / CONFIG_FILE), "nested deeper than 32")
    # Brackets inside strings do not count, and 20 levels are fine.
    (run / CONFIG_FILE).write_text(text)
    _edit_config(run, lambda c: c["fit_info"].update(deep=_nest(20), text="[[[[" * 100 + '\\"{'))
    assert load(run).fit_info["text"] == "[[[[" * 100 + '\\"{'


def test_huge_config_is_refused_before_parsing(run: Path) -> None:
    _edit_config(run, lambda c: c["fit_info"].update(padding="x" * (MAX_CONFIG_BYTES + 1)))
    _refused(run, str(run / CONFIG_FILE), "larger than")


def test_duplicate_and_damaged_json_are_refused(run: Path) -> None:
    text = (run / CONFIG_FILE).read_text()
    (run / CONFIG_FILE).write_text(text.replace('"calibration": {', '"calibration": {"threshold": 1e308, ', 1))
    _refused(run, str(run / CONFIG_FILE), "'threshold' appears twice")
    (run / CONFIG_FILE).write_bytes(b'{"format": "\xff"}')
    _refused(run, str(run / CONFIG_FILE), "UTF-8")
    (run / CONFIG_FILE).write_text('{"format": 1' + "1" * 5000 + "}")
    _refused(run, str(run / CONFIG_FILE), "JSON")


def test_read_json_never_recurses(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 1_000_000 + "]" * 1_000_000)
    with pytest.raises(ModelFileError, match="nested deeper"):
        read_json(path)


def _rewrite_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / TENSORS_FILE))
    edit(tensors)
    save_file(tensors, str(folder / TENSORS_FILE))
    _edit_config(folder, lambda c: c.update(tensors_sha256=sha256_file(folder / TENSORS_FILE)))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_tensor_with_matching_hash_is_refused(run: Path, value: float) -> None:
    _rewrite_tensors(run, lambda t: t["memory_bank"].view(-1).__setitem__(5, value))
    _refused(run, str(run / TENSORS_FILE), "'memory_bank'", "NaN or infinite")


def test_truncated_tensors_with_matching_hash_are_refused(run: Path) -> None:
    data = (run / TENSORS_FILE).read_bytes()
    (run / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    _edit_config(run, lambda c: c.update(tensors_sha256=sha256_file(run / TENSORS_FILE)))
    _refused(run, str(run / TENSORS_FILE), "cannot be read")


def test_tensors_of_the_wrong_shape_are_refused(run: Path) -> None:
    _rewrite_tensors(run, lambda t: t.update(memory_bank=t["memory_bank"][None]))
    _refused(run, str(run / TENSORS_FILE), "do not fit patchcore")


def test_changed_tensors_fail_the_checksum(run: Path) -> None:
    data = bytearray((run / TENSORS_FILE).read_bytes())
    data[-3] ^= 0x40
    (run / TENSORS_FILE).write_bytes(bytes(data))
    _refused(run, str(run / TENSORS_FILE), "checksum")


# -- saving ---------------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_saved_model_and_checkpoint_are_readable_by_others(base_run: Path, tmp_path: Path, umask_022: None) -> None:
    det = load(base_run)
    out = det.save(tmp_path / "nested" / "model")
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {CONFIG_FILE: 0o644, TENSORS_FILE: 0o644}
    assert (out / TENSORS_FILE).read_bytes() == (base_run / TENSORS_FILE).read_bytes()
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(3)}, {"epoch": 1})
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir()}
    assert modes == {CHECKPOINT_JSON: 0o644, CHECKPOINT_TENSORS: 0o644}
    tensors, meta = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(tensors["w"], torch.ones(3)) and meta["epoch"] == 1


def test_model_that_load_would_refuse_is_not_saved(base_run: Path, run: Path) -> None:
    det = load(base_run)
    before = _snapshot(run)
    det.calibration = replace(det.calibration, threshold=math.nan)
    with pytest.raises(ModelFileError, match=r"calibration\.threshold") as info:
        det.save(run)
    assert str(run) in str(info.value) and "\n" not in str(info.value)
    det.calibration = calibrate([1.0, 2.0, 3.0], rule="conformal", false_alarm_rate=det.false_alarm_rate)
    det.memory_bank[0, 0] = math.inf
    with pytest.raises(ModelFileError, match="'memory_bank'"):
        det.save(run / "new")
    assert _snapshot(run) == before and not (run / "new").exists()


_SAVE_SCRIPT = r"""
import json, os, resource, signal, sys
from pathlib import Path
import torch
from defectscope import load
from defectscope.checkpoint import save_checkpoint
from defectscope.errors import DefectscopeError

how, source, target, limit, size = sys.argv[1:6]
det = load(source)
det.fit_info["padding"] = "x" * int(size)
if how == "nobody":
    os.setgid(65534)
    os.setuid(65534)
else:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
try:
    if how == "checkpoint":
        save_checkpoint(Path(target), {"w": torch.zeros(int(size))}, {"epoch": 2})
    else:
        det.save(target)
except DefectscopeError as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"type": None}))
"""


def _save_in_subprocess(how: str, source: Path, target: Path, limit: int = 0, size: int = 0) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _SAVE_SCRIPT, how, str(source), str(target), str(limit), str(size)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_write_refused(result: dict[str, Any], folder: Path, file_name: str, before: dict) -> None:
    assert result["type"] == "OutputError", result
    message = result["message"]
    assert "\n" not in message and str(folder / file_name) in message, message
    assert _snapshot(folder) == before  # the earlier files are byte-identical, and no temporary file is left


@pytest.mark.parametrize("failing, padding", [(TENSORS_FILE, 0), (CONFIG_FILE, 400_000)])
def test_full_disk_during_save_keeps_the_earlier_model(base_run: Path, run: Path, failing: str, padding: int) -> None:
    before = _snapshot(run)
    # Files larger than the limit cannot be written (EFBIG): below the tensors' size, or between
    # the tensors' size and that of a config padded with 400 kB of fit_info.
    limit = 1000 if failing == TENSORS_FILE else (run / TENSORS_FILE).stat().st_size + 10_000
    assert padding == 0 or limit < padding
    result = _save_in_subprocess("limit", base_run, run, limit, padding)
    _assert_write_refused(result, run, failing, before)
    assert load(run).fit_info == load(base_run).fit_info


def test_full_disk_during_checkpoint_save_keeps_the_earlier_checkpoint(base_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, {"w": torch.ones(10)}, {"epoch": 1})
    before = _snapshot(folder)
    result = _save_in_subprocess("checkpoint", base_run, folder, 4000, 100_000)
    _assert_write_refused(result, folder, CHECKPOINT_TENSORS, before)
    tensors, meta = load_checkpoint(folder)
    assert meta["epoch"] == 1 and torch.equal(tensors["w"], torch.ones(10))


def test_read_only_folder_keeps_the_earlier_model(base_run: Path, run: Path, unprivileged_ok: bool) -> None:
    if os.geteuid() != 0:
        before = _snapshot(run)
        os.chmod(run, 0o555)
        try:
            with pytest.raises(OutputError) as info:
                load(base_run).save(run)
        finally:
            os.chmod(run, 0o755)
        _assert_write_refused({"type": "OutputError", "message": str(info.value)}, run, TENSORS_FILE, before)
        return
    # root writes anywhere: save as an unprivileged user into a folder it may read but not write.
    if not unprivileged_ok:
        pytest.skip("the virtualenv or the backbone weights are not readable by an unprivileged user")
    outer = Path(tempfile.mkdtemp(prefix="defectscope-readonly-"))
    try:
        os.chmod(outer, 0o755)
        folder = Path(shutil.copytree(run, outer / "run"))
        os.chmod(folder, 0o755)
        before = _snapshot(folder)
        result = _save_in_subprocess("nobody", base_run, folder)
        _assert_write_refused(result, folder, TENSORS_FILE, before)
        assert "permission denied" in result["message"]
    finally:
        shutil.rmtree(outer)
