"""The contract every method honours: fit on good images, predict scores and maps, save, load.

A method subclasses :class:`Detector` and implements ``_fit``, ``_predict``, ``_state`` and
``_load_state``; calibration, batching, saving and loading live here once. Hyper-parameters are
the keyword arguments of the subclass constructor and are read back from attributes of the same
name (as in scikit-learn), so a saved model is its constructor call plus its tensors.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Self, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..checkpoint import sha256_file as _sha256
from ..data import ImageDataset, Sample, iterate_batches
from ..data.sources import training_samples
from ..errors import DefectscopeError, ModelFileError
from ..postprocess import Calibration, calibrate

FORMAT = "defectscope-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"
T = TypeVar("T")


@dataclass
class Prediction:
    """Output of :meth:`Detector.predict` for a batch of B images of size H x W."""

    scores: torch.Tensor  # (B,) anomaly score, higher = more anomalous
    maps: torch.Tensor  # (B, H, W) anomaly map at input size
    threshold: float | None = None  # image decision threshold, from calibration on good images
    reconstructions: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]: what the part should look like

    @property
    def verdicts(self) -> torch.Tensor:
        """(B,) True where the image is judged anomalous (needs a calibrated threshold)."""
        if self.threshold is None:
            raise DefectscopeError("this model has no calibrated threshold: fit it with held-out good images")
        return self.scores > self.threshold


class Detector(ABC):
    """Base class of all anomaly detectors."""

    name: ClassVar[str]
    #: True for methods that also learn from a few labelled defect images (``fit(..., defects=...)``).
    uses_labelled_defects: ClassVar[bool] = False

    def __init__(self, *, image_size: int = 256, batch_size: int = 16, calibration_fraction: float = 0.1,
                 threshold_sigmas: float = 3.0, seed: int = 0) -> None:
        if image_size < 32 or image_size % 16:
            raise DefectscopeError(f"image_size must be a multiple of 16 and at least 32, got {image_size}")
        if not 0.0 <= calibration_fraction < 1.0:
            raise DefectscopeError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.calibration_fraction = calibration_fraction
        self.threshold_sigmas = threshold_sigmas
        self.seed = seed
        self.calibration: Calibration | None = None
        self.fit_info: dict[str, Any] = {}
        self.labelled_defects: list[Sample] = []
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> Self:
        """Run on ``device`` ("cpu", "cuda", "cuda:1", ...); inputs and outputs stay on the CPU."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DefectscopeError(f"device {device}: no CUDA GPU is available to torch here; use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise DefectscopeError(f"device {device}: only cpu and cuda are supported")
        self.device = device
        self._to_device(device)
        return self

    def _to_device(self, device: torch.device) -> None:
        """Move fitted parts to ``device`` (methods with networks override this)."""

    # -- hyper-parameters ------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor keywords of this detector, read back from its attributes."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        params = {}
        for name in names:
            value = getattr(self, name)
            params[name] = list(value) if isinstance(value, tuple) else value
        return params

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- what a method implements ------------------------------------------------------------
    @abstractmethod
    def _fit(self, dataset: ImageDataset) -> None:
        """Learn from good images."""

    @abstractmethod
    def _predict(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Scores (B,) and maps (B, H, W) for images (B, 3, H, W) in [0, 1]; reconstruction methods
        add their reconstructions (B, 3, H, W) in [0, 1] as a third element."""

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the parameters, rebuild the fitted model."""

    @abstractmethod
    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`_state`."""

    def _fit_details(self) -> dict[str, Any]:
        """Facts about the last ``_fit`` to keep in ``fit_info`` (e.g. training epochs and time)."""
        return {}

    def _extra_config(self) -> dict[str, Any]:
        """Extra JSON facts to store (checked again by :meth:`_check_config` on load)."""
        return {}

    def _check_config(self, config: dict[str, Any], folder: Path) -> None:
        """Verify that the environment still matches what the model was fitted with."""

    # -- fit / predict -----------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self.fit_info)

    def fit(self, data: str | os.PathLike | ImageDataset | Iterable[Sample], *,
            defects: Iterable[Sample] | None = None) -> Self:
        """Fit on good images and calibrate the decision threshold on a held-out slice of them.

        ``data`` is a category folder (MVTec layout: its train/good is used), a folder of good
        images, an :class:`ImageDataset` or a list of :class:`Sample`; samples may come from
        several categories (one unified model). ``defects`` are labelled defect samples (with
        masks) for methods that use them (``uses_labelled_defects``); they are available to
        ``_fit`` as ``self.labelled_defects``.
        """
        samples = list(data.samples) if isinstance(data, ImageDataset) else training_samples(data)
        self.labelled_defects = list(defects or [])
        if self.labelled_defects and not self.uses_labelled_defects:
            raise DefectscopeError(f"{self.name} learns from good images only; it cannot use labelled defects")
        bad = [s.path for s in self.labelled_defects if s.label != 1 or s.mask_path is None]
        if bad:
            raise DefectscopeError(f"{bad[0]}: labelled defects must be defect images with a ground-truth mask")
        fit_part, calib_part = split_calibration(samples, self.calibration_fraction, self.seed)
        torch.manual_seed(self.seed)
        start = time.perf_counter()
        self._fit(ImageDataset(fit_part, self.image_size))
        self.fit_info = {"n_fit_images": len(fit_part), "n_calibration_images": len(calib_part),
                         "categories": sorted({s.category for s in samples}),
                         "labelled_defects": [str(s.path) for s in self.labelled_defects], **self._fit_details()}
        self.calibration = None
        if calib_part:
            scores = [self.predict(batch["image"]).scores
                      for batch in iterate_batches(ImageDataset(calib_part, self.image_size), self.batch_size,
                                                   desc="calibrating")]
            self.calibration = calibrate(torch.cat(scores).numpy(), self.threshold_sigmas)
        self.fit_info["fit_seconds"] = round(time.perf_counter() - start, 3)
        return self

    @torch.no_grad()
    def predict(self, batch: torch.Tensor | dict[str, Any]) -> Prediction:
        """Anomaly scores and maps for a batch: a (B, 3, H, W) tensor in [0, 1] or a batch dict."""
        if not self.is_fitted:
            raise DefectscopeError(f"{type(self).__name__} is not fitted: call fit() or load() first")
        images = batch["image"] if isinstance(batch, dict) else batch
        if images.ndim == 3:
            images = images[None]
        expected = (3, self.image_size, self.image_size)
        if tuple(images.shape[1:]) != expected:
            raise DefectscopeError(f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                                   f"got {tuple(images.shape)}")
        scores, maps, *recon = self._predict(images.float().to(self.device))
        return Prediction(scores.float().cpu(), maps.float().cpu(), self.calibration.threshold if self.calibration else None,
                          recon[0].float().cpu() if recon else None)

    # -- save / load -------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``folder`` (created if needed).

        Files are written under temporary names and renamed, so an interrupted save never leaves
        a half-written model in place of a good one.
        """
        if not self.is_fitted:
            raise DefectscopeError(f"{type(self).__name__} is not fitted: nothing to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._state().items()}
        tmp_tensors = folder / (TENSORS_FILE + ".tmp")
        save_file(tensors, str(tmp_tensors))
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "defectscope_version": __version__,
            "method": self.name,
            "params": self.get_params(),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "fit_info": self.fit_info,
            "tensors_sha256": _sha256(tmp_tensors),
            **self._extra_config(),
        }
        tmp_config = folder / (CONFIG_FILE + ".tmp")
        tmp_config.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp_tensors, folder / TENSORS_FILE)
        os.replace(tmp_config, folder / CONFIG_FILE)
        return folder


def fitted(detector: Detector, value: T | None) -> T:
    """``value`` (a fitted part of ``detector``), or a clear error when it was not fitted or loaded."""
    if value is None:
        raise DefectscopeError(f"{type(detector).__name__} is not fitted: call fit() or load() first")
    return value


def split_calibration(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of good images into a fitting part and a held-out calibration part.

    At least one image is held out when ``fraction`` > 0 and there are two or more images.
    """
    n_calib = int(round(len(samples) * fraction))
    if fraction > 0 and len(samples) >= 2:
        n_calib = max(1, n_calib)
    n_calib = min(n_calib, len(samples) - 1)
    order = np.random.default_rng(seed).permutation(len(samples))
    calib = set(order[:n_calib].tolist())
    return ([s for i, s in enumerate(samples) if i not in calib], [s for i, s in enumerate(samples) if i in calib])


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a run folder, with clear errors for anything wrong."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: no such model folder")
    if not path.is_file():
        raise ModelFileError(f"{path}: missing; is {folder} a folder written by `defectscope fit`?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc}); the file is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a defectscope model config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{path}: written by a newer defectscope (format {config['format_version']}); upgrade")
    return config


def load(folder: str | os.PathLike) -> Detector:
    """Rebuild any fitted detector from its run folder (no code is executed from the files)."""
    from . import METHODS

    folder = Path(folder)
    config = read_config(folder)
    method = config.get("method")
    if method not in METHODS:
        raise ModelFileError(f"{folder / CONFIG_FILE}: unknown method {method!r} (known: {', '.join(METHODS)})")
    tensors_path = folder / TENSORS_FILE
    if not tensors_path.is_file():
        raise ModelFileError(f"{tensors_path}: missing")
    if _sha256(tensors_path) != config.get("tensors_sha256"):
        raise ModelFileError(f"{tensors_path}: checksum does not match {CONFIG_FILE}; the file was changed or truncated")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{tensors_path}: cannot be read ({exc})") from None
    try:
        detector = METHODS[method](**config["params"])
    except (TypeError, KeyError) as exc:
        raise ModelFileError(f"{folder / CONFIG_FILE}: parameters do not fit {method} ({exc})") from None
    detector._check_config(config, folder)
    try:
        detector._load_state(tensors)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ModelFileError(f"{tensors_path}: tensors do not fit {method} ({exc})") from None
    detector.fit_info = config.get("fit_info") or {"loaded": True}
    calib = config.get("calibration")
    detector.calibration = Calibration(**calib) if calib else None
    return detector
