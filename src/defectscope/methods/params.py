"""Hyper-parameters of a method: their specs (type, default, help), command-line parsing and checks.

:meth:`Detector.param_specs` lists a method's constructor keywords as :class:`ParamSpec`; a
front end builds its options from them and turns ``KEY=VALUE`` strings into values with
:meth:`ParamSpec.parse`, which knows ints, finite floats, bools, ``X | None``, strings, tuples
and lists, and ``Literal`` choices. The checks here are the ones many constructors share.
"""

from __future__ import annotations

import inspect
import json
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from ..errors import DefectscopeError

TRUE = ("true", "1", "yes")
FALSE = ("false", "0", "no")
NONE = ("none", "null")

#: One-line help of the parameters several methods share (a method's own docstring covers the rest).
HELP: dict[str, str] = {
    "backbone": "pretrained feature extractor",
    "layers": "backbone layers by stride name (s4, s8, s16, ...)",
    "weights": "backbone weights file (default: the official weights)",
    "image_size": "side in pixels the images are resized to (multiple of 16)",
    "batch_size": "images per batch",
    "calibration_fraction": "share of the good images held out to calibrate the threshold",
    "threshold_rule": "how held-out scores set the threshold: conformal (a false-alarm rate), mean_sigma, recall",
    "false_alarm_rate": "conformal rule: the share of good images allowed to be judged anomalous",
    "false_alarm_confidence": "conformal rule: keep the rate under false_alarm_rate with this probability "
    "for this calibration (none: on average)",
    "target_recall": "recall rule: the share of defects to catch (needs held-out labelled defects)",
    "threshold_sigmas": "mean_sigma rule: threshold = mean + this many standard deviations, at least the highest",
    "seed": "random seed",
    "epochs": "training epochs",
    "lr": "learning rate",
    "time_budget": "stop training after this many seconds (none: no limit)",
    "blur_sigma": "Gaussian smoothing of the anomaly map, in pixels",
    "coreset_ratio": "share of the patch features kept in the memory bank",
    "neighbourhood": "side of the local average over patch features",
    "projection_dim": "random projection size used by the coreset selection",
    "weight_decay": "weight decay of the optimizer",
    "texture_dir": "folder of texture images for synthetic anomalies (none: the training images)",
    "anomaly_probability": "share of training images given a synthetic anomaly",
}


@dataclass(frozen=True)
class ParamSpec:
    """One constructor keyword of a method: its name, type annotation, default and a one-line help."""

    name: str
    annotation: Any
    default: Any
    help: str = ""

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The allowed values of a ``Literal`` parameter (None for others)."""
        inner, _ = _strip_none(self.annotation)
        return get_args(inner) if get_origin(inner) is Literal else None

    @property
    def type_name(self) -> str:
        """The type as a user reads it: ``int``, ``float | none``, ``str,str,...``, ``both|pixel``."""
        return _type_name(self.annotation)

    def parse(self, raw: str) -> Any:
        """The value of a command-line string ``raw``; a one-line DefectscopeError when it does not fit."""
        try:
            return _parse(self.annotation, raw.strip())
        except _BadValue as exc:
            raise DefectscopeError(f"{self.name}={raw}: expected {exc}") from None

    def format(self, value: Any) -> str:
        """``value`` written so that :meth:`parse` reads it back."""
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (tuple, list)):
            return ",".join(self.format(v) for v in value)
        return str(value)


class _BadValue(Exception):
    """What the value should have been (the message completes "expected ...")."""


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    """(``X``, True) for ``X | None``, (annotation, False) otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) < len(get_args(annotation)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007 (built at run time)
    return annotation, False


def _type_name(annotation: Any) -> str:
    inner, optional = _strip_none(annotation)
    origin = get_origin(inner)
    if origin is Literal:
        name = "|".join(str(c) for c in get_args(inner))
    elif origin in (tuple, list):
        args = get_args(inner)
        if origin is tuple and args and args[-1] is not Ellipsis:
            name = ",".join(_type_name(a) for a in args)
        else:
            name = f"{_type_name(args[0]) if args else 'str'},..."
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} | none" if optional else name


def _parse(annotation: Any, raw: str) -> Any:
    inner, optional = _strip_none(annotation)
    if optional and raw.lower() in NONE:
        return None
    try:
        return _parse_plain(inner, raw)
    except _BadValue as exc:
        if optional:
            raise _BadValue(f"{exc} or none") from None
        raise


def _parse_plain(annotation: Any, raw: str) -> Any:
    origin = get_origin(annotation)
    if origin is Literal:
        for choice in get_args(annotation):
            if raw == str(choice):
                return choice
        raise _BadValue(f"one of {', '.join(str(c) for c in get_args(annotation))}")
    if origin in (tuple, list):
        return _parse_sequence(annotation, raw)
    if annotation is bool:
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise _BadValue("true or false")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise _BadValue("an integer") from None
    if annotation is float:
        try:
            value = float(raw)
        except ValueError:
            raise _BadValue("a number") from None
        if not math.isfinite(value):
            raise _BadValue("a finite number")
        return value
    if annotation is str:
        return raw
    raise _BadValue(f"a value of type {annotation}")


def _parse_sequence(annotation: Any, raw: str) -> tuple[Any, ...] | list[Any]:
    """A comma-separated or JSON list; a fixed-length tuple must have exactly its length."""
    origin, args = get_origin(annotation), get_args(annotation)
    if raw.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError:
            raise _BadValue(f"a JSON list of {_type_name(annotation)}") from None
        if not isinstance(items, list):
            raise _BadValue(f"a list of {_type_name(annotation)}")
        parts = [str(item) for item in items]
    else:
        parts = [p.strip() for p in raw.split(",")] if raw else []
    fixed = origin is tuple and args and args[-1] is not Ellipsis
    types_ = list(args) if fixed else [args[0] if args else str] * len(parts)
    if len(types_) != len(parts) or (not fixed and not parts):
        raise _BadValue(f"{len(types_) if fixed else 'one or more'} comma-separated values ({_type_name(annotation)})")
    try:
        values = [_parse_plain(t, p) for t, p in zip(types_, parts)]
    except _BadValue as exc:
        raise _BadValue(f"comma-separated values, each {exc}") from None
    return tuple(values) if origin is tuple else values


def specs_of(cls: type[object], help_texts: dict[str, str] | None = None) -> list[ParamSpec]:
    """The :class:`ParamSpec` of every keyword of ``cls.__init__``, in signature order."""
    hints = typing.get_type_hints(cls.__init__)
    texts = HELP | (help_texts or {})
    specs = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = None if param.default is param.empty else param.default
        specs.append(ParamSpec(name, hints.get(name, str), default, texts.get(name, "")))
    return specs


def base_params(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` (a constructor's ``locals()``) that the constructors of the bases
    of ``cls`` take by name, to hand them on with ``super().__init__(**...)``."""
    names: set[str] = set()
    for base in cls.__mro__[1:]:
        init = base.__dict__.get("__init__")
        if init is not None and base is not object:
            names |= {
                n
                for n, p in inspect.signature(init).parameters.items()
                if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
            } - {"self"}
    return {k: v for k, v in values.items() if k in names}


def check_at_least(minimum: float, **values: float | int | None) -> None:
    """Every given value (None skipped) is at least ``minimum``; a DefectscopeError naming the first that is not."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise DefectscopeError(f"{name} must be at least {minimum}, got {value}")


def check_between(low: float, high: float, **values: float | None) -> None:
    """Every given value (None skipped) is in [low, high]."""
    for name, value in values.items():
        if value is not None and not low <= value <= high:
            raise DefectscopeError(f"{name} must be in [{low}, {high}], got {value}")


def check_finite(values: Iterable[tuple[str, Any]]) -> None:
    """Every float (also inside tuples and lists) of the (name, value) pairs is finite."""
    for name, value in values:
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise DefectscopeError(f"{name} must be a finite number, got {value}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise DefectscopeError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
