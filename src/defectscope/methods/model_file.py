"""The model file format: a run folder with ``config.json`` + ``model.safetensors``; save, read, load.

``config.json`` holds the method, its constructor parameters, the calibration, facts about the
fit and the sha256 of ``model.safetensors``. Loading treats both files as untrusted data: the
config is checked against the format (size and nesting bounded before parsing, then types,
ranges and keys), the calibration must follow from its stored statistics, the tensors must match
their hash and be finite. Nothing in the files is ever run as code. Every problem is one
:class:`ModelFileError` line naming the file (and the key).

Saving writes both files in full under temporary names and renames them, tensors first and the
config (holding the tensors' hash) last, so a full disk or a crash leaves the earlier model intact.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    NoReturn,
    TypeGuard,
    Union,
    get_args,
    get_origin,
)

import torch
from safetensors import SafetensorError

from .. import __version__
from ..checkpoint import sha256_file, write_hashed_pair
from ..errors import DefectscopeError, ModelFileError
from ..geometry import Geometry
from ..outputs import StagedFiles, json_safe, make_folder
from ..tensor_file import all_finite, read_tensors
from ..thresholds import CONFORMAL, MEAN_SIGMA, RULE_SETTINGS, RULES, Calibration

if TYPE_CHECKING:
    from .base import Detector

FORMAT = "defectscope-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"
#: Limits checked before ``config.json`` is parsed.
MAX_CONFIG_BYTES = 16 * 2**20
MAX_DEPTH = 32

#: Top-level keys every config holds, and the optional ``run`` record of the run layer.
REQUIRED_KEYS = (
    "format",
    "format_version",
    "defectscope_version",
    "method",
    "params",
    "calibration",
    "fit_info",
    "tensors_sha256",
)
OPTIONAL_KEYS = ("run", "calibration_history", "calibration_images", "geometry")
#: Constructor parameters added after format 1 was fixed, with the value that models saved
#: before them behaved by (filled in when such a model is read).
ADDED_PARAMS: dict[str, Any] = {
    "threshold_rule": MEAN_SIGMA,
    "false_alarm_rate": 0.05,
    "false_alarm_confidence": None,
    "target_recall": 0.95,
}

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,59}")
_JSON_TOKENS = re.compile(r'\\.|["{}\[\]]', re.DOTALL)


# -- saving ---------------------------------------------------------------------------------------
def save_model(detector: Detector, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` of a fitted detector into ``folder`` (created if needed).

    The model is checked as :func:`load` would check it before anything is written, so a saved
    model always loads. Raises :class:`OutputError` when the files cannot be written; any
    earlier model in ``folder`` is then unchanged and no temporary file is left.
    """
    if not detector.is_fitted:
        raise DefectscopeError(f"{type(detector).__name__} is not fitted: nothing to save")
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in detector._state().items()}
    config = _config_of(detector, "0" * 64)
    where = f"{folder}: cannot save the {detector.name} model"
    validate_config(config, where)
    check_tensors_finite(tensors, where)
    make_folder(folder, "the model")
    write_hashed_pair(folder, TENSORS_FILE, tensors, CONFIG_FILE, config, _config_text)
    return folder


def save_calibration(detector: Detector, folder: str | os.PathLike) -> Path:
    """Rewrite only ``folder/config.json`` with the detector's (new) calibration and parameters.

    The tensors file must be the one the config on disk names (it is left untouched); the new
    config is checked as :func:`load` checks it and replaces the old one atomically.
    """
    folder = Path(folder)
    old = read_config(folder)
    if sha256_file(folder / TENSORS_FILE) != old["tensors_sha256"]:
        raise ModelFileError(f"{folder / TENSORS_FILE}: checksum does not match {CONFIG_FILE}; not changing it")
    config = _config_of(detector, old["tensors_sha256"])
    validate_config(config, f"{folder}: cannot save the new calibration")
    with StagedFiles() as staged:
        staged.stage(folder / CONFIG_FILE, _config_text(config))
        staged.commit()
    return folder


def _config_of(detector: Detector, tensors_sha256: str) -> dict[str, Any]:
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "defectscope_version": __version__,
        "method": detector.name,
        "params": detector.get_params(),
        "calibration": detector.calibration.to_dict() if detector.calibration else None,
        "fit_info": detector.fit_info,
        "tensors_sha256": tensors_sha256,
        **detector._extra_config(),
    }
    run = getattr(detector, "run_info", None)
    if run is not None:
        config["run"] = run
    if detector.calibration_history:
        config["calibration_history"] = detector.calibration_history
    if detector.calibration_images:
        config["calibration_images"] = detector.calibration_images
    if detector.geometry != Geometry():
        config["geometry"] = detector.geometry.to_json()
    return config


def _config_text(config: dict[str, Any]) -> str:
    return json.dumps(json_safe(config), indent=2, allow_nan=False) + "\n"


# -- reading and checking -------------------------------------------------------------------------
def read_json(path: Path, *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in ``path``, refusing files over ``max_bytes``, nesting deeper than
    ``max_depth`` (checked before parsing) and duplicate keys; one-line :class:`ModelFileError`."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise ModelFileError(f"{path}: larger than {max_bytes} bytes; not a defectscope file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{path}: not UTF-8 text (byte {exc.start}); the file is damaged") from None
    if _nesting_exceeds(text, max_depth):
        raise ModelFileError(f"{path}: JSON nested deeper than {max_depth} levels; not a defectscope file")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise ModelFileError(f"{path}: key {exc} appears twice in one object; the file is damaged") from None
    except (ValueError, RecursionError) as exc:
        message = " ".join(str(exc).split())[:200]
        raise ModelFileError(f"{path}: not valid JSON ({message}); the file is damaged") from None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(_short(key))
        result[key] = value
    return result


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside JSON strings nest deeper than ``limit`` (a scan, no recursion)."""
    depth, in_string = 0, False
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token == '"':
            in_string = not in_string
        elif in_string or token[0] == "\\":
            continue
        elif token in "{[":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed and checked ``config.json`` of a run folder, with clear errors for anything wrong."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: no such model folder")
    if not path.is_file():
        raise ModelFileError(f"{path}: missing; is {folder} a folder written by `defectscope fit`?")
    config = read_json(path)
    if isinstance(config, dict) and isinstance(config.get("params"), dict):
        from . import METHODS

        method = config.get("method")
        cls = METHODS.get(method) if isinstance(method, str) else None
        for key, value in (ADDED_PARAMS | (cls.added_params if cls is not None else {})).items():
            config["params"].setdefault(key, value)
    validate_config(config, str(path))
    return config


def validate_config(config: Any, where: str) -> None:
    """Check a model config against the format; a :class:`ModelFileError` starting with ``where``."""
    from . import METHODS

    def fail(message: str) -> NoReturn:
        raise ModelFileError(f"{where}: {message}")

    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fail("not a defectscope model config")
    version = config.get("format_version")
    if "format_version" not in config:
        fail("format_version: missing")
    if not _is_int(version):
        fail(f"format_version must be an integer, got {_short(version)}")
    if version > FORMAT_VERSION:
        fail(f"written by a newer defectscope (format {version}); upgrade defectscope to load it")
    if version < 1:
        fail(f"format_version {version} is not a defectscope model format (supported: 1 to {FORMAT_VERSION})")
    method = config.get("method")
    if not isinstance(method, str) or method not in METHODS:
        fail(f"unknown method {_short(method)} (known: {', '.join(METHODS)})")
    cls = METHODS[method]
    for key in REQUIRED_KEYS:
        if key not in config:
            fail(f"{key}: missing")
    extra = _extra_keys(cls)
    for key in config:
        if key not in REQUIRED_KEYS and key not in OPTIONAL_KEYS and key not in extra:
            fail(f"{_name(key)}: unknown key for a {method} model")
    for key in sorted(extra):
        if key not in config:
            fail(f"{key}: missing (a {method} model records it)")
        if not isinstance(config[key], extra[key]):
            fail(f"{key} must be a {extra[key].__name__}, got {_short(config[key])}")
    if not isinstance(config["defectscope_version"], str):
        fail(f"defectscope_version must be a string, got {_short(config['defectscope_version'])}")
    for key in ("tensors_sha256", "backbone_weights_sha256"):
        if key in config and not (isinstance(config[key], str) and _SHA256.fullmatch(config[key])):
            fail(f"{key} must be 64 lowercase hex digits, got {_short(config[key])}")
    for key in ("fit_info", "run"):
        if key in config and not isinstance(config[key], dict):
            fail(f"{key} must be an object, got {_short(config[key])}")
    params = config["params"]
    if not isinstance(params, dict):
        fail(f"params must be an object, got {_short(params)}")
    _check_params(cls, params, fail)
    calibration = config["calibration"]
    if calibration is not None:
        try:
            parsed = Calibration.from_dict(calibration, nonnegative_scores=METHODS[method].nonnegative_scores)
        except (TypeError, ValueError) as exc:
            fail(str(exc))
        if parsed.rule != params.get("threshold_rule"):
            rule = _short(params.get("threshold_rule"))
            fail(f"calibration.rule {parsed.rule} differs from params.threshold_rule {rule}")
        name = RULE_SETTINGS[parsed.rule]  # the parameter holding the rule's setting
        stored = getattr(parsed, "sigmas" if name == "threshold_sigmas" else name)
        if stored != params.get(name):
            field = "sigmas" if name == "threshold_sigmas" else name
            fail(f"calibration.{field} {stored} differs from params.{name} {_short(params.get(name))}")
        if parsed.rule == CONFORMAL and parsed.confidence != params.get("false_alarm_confidence"):
            given = _short(params.get("false_alarm_confidence"))
            fail(f"calibration.confidence {parsed.confidence} differs from params.false_alarm_confidence {given}")
    if "calibration_history" in config:
        _check_history(config["calibration_history"], fail)
    images = config.get("calibration_images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        fail(f"calibration_images must be a list of paths, got {_short(images)}")
    if "geometry" in config:
        try:
            geometry = Geometry.from_json(config["geometry"])
        except DefectscopeError as exc:
            fail(f"geometry: {exc}")
        if geometry.tile is not None and not METHODS[method].fits_on_tiles:
            fail(f"geometry: {method} cannot be fitted on tiles")


def _check_history(history: Any, fail: Callable[[str], NoReturn]) -> None:
    """Earlier calibrations, newest last: each with its rule, threshold and when it was replaced."""
    if not isinstance(history, list):
        fail(f"calibration_history must be a list, got {_short(history)}")
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            fail(f"calibration_history[{i}] must be an object, got {_short(entry)}")
        if entry.get("rule") not in RULES:
            fail(f"calibration_history[{i}].rule: unknown threshold rule {_short(entry.get('rule'))}")
        threshold = entry.get("threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
            fail(f"calibration_history[{i}].threshold must be a finite number, got {_short(threshold)}")
        if not isinstance(entry.get("replaced"), str):
            fail(f"calibration_history[{i}].replaced must be a date string, got {_short(entry.get('replaced'))}")


def _extra_keys(cls: type[Detector]) -> dict[str, type]:
    """The keys (and their JSON types) that the ``_extra_config`` of ``cls`` adds."""
    return dict(cls.extra_config_keys)


def _check_params(cls: type[Detector], params: dict[str, Any], fail: Callable[[str], NoReturn]) -> None:
    """``params`` are exactly the keyword parameters of ``cls.__init__``, each of its annotated type."""
    from ..backbones import BACKBONES

    signature = _init_parameters(cls)
    hints = typing.get_type_hints(cls.__init__)
    for key, value in params.items():
        if key not in signature:
            fail(f"params.{_name(key)}: not a parameter of {cls.__name__}")
        if key in hints and not _fits(hints[key], value):
            fail(f"params.{key} must be {_describe_type(hints[key])}, got {_short(value)}")
    for key in signature:
        if key not in params:
            fail(f"params.{key}: missing")
    if "backbone" in params and params["backbone"] not in BACKBONES:
        fail(f"params.backbone: unknown backbone {_short(params['backbone'])} (known: {', '.join(BACKBONES)})")


def _init_parameters(cls: type[Detector]) -> dict[str, Any]:
    return {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(annotation: Any, value: Any) -> bool:
    """Whether the JSON ``value`` is a value of ``annotation`` (tuples and lists are JSON arrays)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None) or annotation is None:
        return value is None
    if origin in (Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(a, v) for a, v in zip(args, value))
        return all(_fits(args[0], v) for v in value) if args else True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    return True  # an annotation the format has no JSON form for: left to the constructor


def _describe_type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe_type(a) for a in args)})"
        return f"a list of {_describe_type(args[0]) if args else 'values'}"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(annotation, str(annotation))


def check_tensors_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every floating-point tensor holds only finite numbers; else a :class:`ModelFileError` naming the first."""
    for name, tensor in tensors.items():
        if not all_finite(tensor):
            raise ModelFileError(f"{where}: tensor {_short(name)} holds NaN or infinite values; the model is damaged")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(key: str) -> str:
    """A key as written in messages: plain when it is a simple name, quoted otherwise."""
    return key if _PLAIN_NAME.fullmatch(key) else _short(key)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- loading --------------------------------------------------------------------------------------
def load(folder: str | os.PathLike) -> Detector:
    """Rebuild any fitted detector from its run folder (no code is executed from the files)."""
    from . import METHODS

    folder = Path(folder)
    config = read_config(folder)
    config_path = folder / CONFIG_FILE
    method = config["method"]
    tensors_path = folder / TENSORS_FILE
    if not tensors_path.is_file():
        raise ModelFileError(f"{tensors_path}: missing")
    if sha256_file(tensors_path) != config["tensors_sha256"]:
        raise ModelFileError(
            f"{tensors_path}: checksum does not match {CONFIG_FILE}; the file was changed or truncated"
        )
    try:
        detector = METHODS[method](**config["params"])
    except (TypeError, ValueError, DefectscopeError) as exc:
        raise ModelFileError(f"{config_path}: params do not fit {method} ({_one_line(exc)})") from None
    try:
        tensors = read_tensors(str(tensors_path), detector._mapped_tensors())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{tensors_path}: cannot be read ({_one_line(exc)})") from None
    check_tensors_finite(tensors, str(tensors_path))
    try:
        detector._check_config(config, folder)
    except DefectscopeError as exc:
        raise type(exc)(_one_line(exc, 1000)) from None
    try:
        detector._load_state(tensors)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, DefectscopeError) as exc:
        raise ModelFileError(f"{tensors_path}: tensors do not fit {method} ({_one_line(exc)})") from None
    detector.fit_info = config["fit_info"] or {"loaded": True}
    calibration = config["calibration"]
    detector.calibration = (
        Calibration.from_dict(calibration, nonnegative_scores=METHODS[method].nonnegative_scores)
        if calibration is not None
        else None
    )
    detector.run_info = config.get("run")  # read by the run layer
    detector.calibration_history = list(config.get("calibration_history", []))
    detector.calibration_images = list(config.get("calibration_images", []))
    detector.geometry = Geometry.from_json(config["geometry"]) if "geometry" in config else Geometry()
    return detector
