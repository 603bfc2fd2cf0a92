"""The contract every method honours: fit on good images, predict scores and maps, save, load.

A method subclasses :class:`Detector` and implements ``_fit``, ``_predict``, ``_state`` and
``_load_state``; calibration, batching, saving and loading live here once. Hyper-parameters are
the keyword arguments of the subclass constructor and are read back from attributes of the same
name (as in scikit-learn), so a saved model is its constructor call plus its tensors.
"""

from __future__ import annotations

import inspect
import os
import time
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar

import numpy as np
import torch

from ..data import ImageDataset, Sample
from ..data.dataset import Batch
from ..data.sources import training_samples
from ..devices import check_device
from ..errors import DefectscopeError, NotExportable
from ..geometry import Geometry
from ..geometry.inspect import Inspected, inspect_samples
from ..geometry.sources import check_region, view_dataset
from ..thresholds import (
    DEFAULT_FALSE_ALARM_RATE,
    DEFAULT_RULE,
    DEFAULT_TARGET_RECALL,
    RECALL,
    Calibration,
    ThresholdRule,
    calibrate,
    check_rule_setting,
    defects_needed,
)
from .model_file import load, save_model  # noqa: F401  (load is re-exported)
from .params import ParamSpec, check_at_least, check_finite, specs_of

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
        """(B,) True where the image is not judged good: above the threshold, or a score that is not a
        finite number (never trusted as good; :func:`defectscope.records.judge` names it ``error``)."""
        if self.threshold is None:
            raise DefectscopeError("this model has no calibrated threshold: fit it with held-out good images")
        return ~(self.scores <= self.threshold)


class Engine(Protocol):
    """What runs a fitted detector's computation instead of its own ``_predict`` (:mod:`defectscope.engines`)."""

    name: str

    def run(self, images: torch.Tensor) -> Prediction:
        """Scores (B,) and maps (B, H, W) for images (B, 3, H, W) in [0, 1], as ``_predict`` gives them."""
        ...


class _CheckedParams(ABCMeta):
    """Checks what every constructor shares once the whole constructor has run: finite floats."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        detector = super().__call__(*args, **kwargs)
        check_finite(detector.get_params().items())
        return detector


class Detector(ABC, metaclass=_CheckedParams):
    """Base class of all anomaly detectors."""

    name: ClassVar[str]
    #: True for methods that also learn from a few labelled defect images (``fit(..., defects=...)``).
    uses_labelled_defects: ClassVar[bool] = False
    #: True for methods whose scores are never negative (distances, errors): a saved threshold must then be > 0.
    nonnegative_scores: ClassVar[bool] = False
    #: Top-level config.json keys that this class's ``_extra_config`` adds, with their JSON types.
    extra_config_keys: ClassVar[dict[str, type]] = {}
    #: Parameters added to this method after models were saved without them, with the value that
    #: such models behaved by (filled in when one is read; :func:`.model_file.read_config`).
    added_params: ClassVar[dict[str, Any]] = {}
    #: One-line help of a method's own parameters (shared ones are in :data:`.params.HELP`).
    param_help: ClassVar[dict[str, str]] = {}
    #: False for methods that pair each training item with its own image (they cannot fit on tiles).
    fits_on_tiles: ClassVar[bool] = True
    #: Why this method has no ONNX graph (None: :meth:`export_module` gives one).
    export_unsupported: ClassVar[str | None] = "it has no export graph yet"
    #: Name of a third output of the export graph at which an engine may hand over to
    #: :meth:`_predict_from_handover` (a step that torch code does faster on the CPU), or None.
    export_handover: ClassVar[str | None] = None

    def __init__(
        self,
        *,
        image_size: int = 256,
        batch_size: int = 16,
        calibration_fraction: float = 0.1,
        threshold_rule: ThresholdRule = DEFAULT_RULE,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        false_alarm_confidence: float | None = None,
        target_recall: float = DEFAULT_TARGET_RECALL,
        threshold_sigmas: float = 3.0,
        seed: int = 0,
    ) -> None:
        if image_size < 32 or image_size % 16:
            raise DefectscopeError(f"image_size must be a multiple of 16 and at least 32, got {image_size}")
        check_at_least(1, batch_size=batch_size)
        check_at_least(0, seed=seed)
        try:
            check_rule_setting(
                threshold_rule, false_alarm_rate, threshold_sigmas, target_recall, false_alarm_confidence
            )
        except ValueError as exc:
            raise DefectscopeError(str(exc)) from None
        if not 0.0 <= calibration_fraction < 1.0:
            raise DefectscopeError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.calibration_fraction = calibration_fraction
        self.threshold_rule = threshold_rule
        self.false_alarm_rate = false_alarm_rate
        self.false_alarm_confidence = false_alarm_confidence
        self.target_recall = target_recall
        self.threshold_sigmas = threshold_sigmas
        self.seed = seed
        self.calibration: Calibration | None = None
        #: Earlier calibrations replaced by ``defectscope calibrate``, newest last (``config.json``).
        self.calibration_history: list[dict[str, Any]] = []
        #: Images ``defectscope calibrate`` scored into the calibration; ``test`` leaves them out.
        self.calibration_images: list[str] = []
        self.fit_info: dict[str, Any] = {}
        #: What the run layer recorded about the run that fitted this model (``config.json``'s ``run``).
        self.run_info: dict[str, Any] | None = None
        self.labelled_defects: list[Sample] = []
        #: How images become this method's inputs (:mod:`defectscope.geometry`); set by :meth:`fit`.
        self.geometry = Geometry()
        self.device = torch.device("cpu")
        #: What computes predictions: None for this detector's own torch code, else an exported graph's engine.
        self.engine: Engine | None = None

    @property
    def engine_name(self) -> str:
        """What computes this detector's predictions, as records name it: ``torch``, ``onnxruntime``, ...
        (``-int8`` appended for a quantised graph)."""
        if self.engine is None:
            return "torch"
        return self.engine.name + ("-int8" if getattr(self.engine, "int8", False) else "")

    def to(self, device: str | torch.device) -> Self:
        """Run on ``device`` ("cpu", "cuda", "cuda:1", ...); inputs and outputs stay on the CPU."""
        self.device = device = check_device(device)
        for module in self._modules().values():
            if module is not None:
                module.to(device)
        return self

    def _modules(self) -> dict[str, torch.nn.Module | None]:
        """The networks of this detector by name (None: not built yet), moved by :meth:`to`."""
        return {}

    # -- hyper-parameters ------------------------------------------------------------------
    @classmethod
    def param_specs(cls) -> list[ParamSpec]:
        """The constructor keywords of this method: name, type, default and a one-line help."""
        return specs_of(cls, cls.param_help)

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
    def _predict(self, images: torch.Tensor) -> Prediction:
        """Scores (B,) and maps (B, H, W) for images (B, 3, H, W) in [0, 1] on ``self.device``;
        reconstruction methods add their reconstructions (B, 3, H, W) in [0, 1]. The threshold
        is left to :meth:`predict`."""

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the parameters, rebuild the fitted model."""

    @abstractmethod
    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`_state`."""

    def _mapped_tensors(self) -> set[str]:
        """Tensors of :meth:`_state` that loading memory-maps from the model file instead of reading."""
        return set()

    def export_module(self) -> torch.nn.Module:
        """A traceable module: images (B, 3, S, S) in [0, 1] -> (scores (B,), maps (B, S, S)), computing what
        :meth:`_predict` computes with this fitted detector's tensors (see :mod:`defectscope.export`)."""
        if self.export_unsupported is not None:
            raise NotExportable(f"{self.name} cannot be exported to ONNX: {self.export_unsupported}")
        return _PredictGraph(self)

    def _predict_from_handover(self, value: torch.Tensor) -> Prediction:
        """The rest of :meth:`_predict` from the export graph's ``export_handover`` output."""
        raise NotImplementedError(f"{self.name} has no export handover")

    def _fit_details(self) -> dict[str, Any]:
        """Facts about the last ``_fit`` to keep in ``fit_info`` (e.g. training epochs and time)."""
        return {}

    def fit_notes(self) -> list[str]:
        """Sentences for the user about a choice the last fit made from the data (``fit`` prints them)."""
        return []

    def _extra_config(self) -> dict[str, Any]:
        """Extra JSON facts to store (checked again by :meth:`_check_config` on load)."""
        return {}

    def _check_config(self, config: dict[str, Any], folder: Path) -> None:
        """Verify that the environment still matches what the model was fitted with."""

    def preflight(self) -> None:
        """Check before any work starts that what fitting needs is there (e.g. weights files)."""

    # -- fit / predict -----------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self.fit_info)

    def fit(
        self,
        data: str | os.PathLike | ImageDataset | Iterable[Sample],
        *,
        defects: Iterable[Sample] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        geometry: Geometry | None = None,
    ) -> Self:
        """Fit on good images and calibrate the decision threshold on a held-out slice of them.

        ``data`` is a category folder (MVTec layout: its train/good is used), a folder of good
        images, an :class:`ImageDataset` or a list of :class:`Sample`; samples may come from
        several categories (one unified model). ``defects`` are labelled defect samples: methods
        that learn from them (``uses_labelled_defects``; masks needed) find them in
        ``self.labelled_defects`` during ``_fit``; for the others they are held out, estimate the
        miss rate at the threshold and serve the ``recall`` threshold rule. The threshold follows
        ``threshold_rule`` (:mod:`defectscope.thresholds`). Methods trained in epochs save their training
        state in ``checkpoint_dir`` as they go and continue from it with ``resume=True``; the
        others ignore ``checkpoint_dir`` and refuse ``resume``. ``geometry`` (default: the square
        resize) says how images become the method's inputs; it is saved with the model.
        """
        self._start_run(None if checkpoint_dir is None else Path(checkpoint_dir), resume)
        if isinstance(data, ImageDataset):  # a dataset of views lists each image once in ``images``
            samples = list(getattr(data, "images", data.samples))
        else:
            samples = training_samples(data)
        if geometry is not None:
            self.check_geometry(geometry, samples)
            self.geometry = geometry
        self.labelled_defects = list(defects or [])
        not_defects = [s.path for s in self.labelled_defects if s.label != 1]
        if not_defects:
            raise DefectscopeError(f"{not_defects[0]}: labelled defects must be defect images")
        if self.uses_labelled_defects:
            no_mask = [s.path for s in self.labelled_defects if s.mask_path is None]
            if no_mask:
                raise DefectscopeError(
                    f"{no_mask[0]}: labelled defects {self.name} learns from need a ground-truth mask"
                )
        held_out_defects = [] if self.uses_labelled_defects else self.labelled_defects
        self.check_threshold_rule(self.labelled_defects)
        fit_part, calib_part = split_calibration(samples, self.calibration_fraction, self.seed)
        torch.manual_seed(self.seed)
        start = time.perf_counter()
        dataset = self.fit_dataset(fit_part)
        self._fit(dataset)
        self.fit_info = {
            "n_fit_images": len(fit_part),
            **({"n_fit_views": len(dataset)} if len(dataset) != len(fit_part) else {}),
            "n_calibration_images": len(calib_part),
            "categories": sorted({s.category for s in samples}),
            "labelled_defects": [str(s.path) for s in self.labelled_defects],
            **self._fit_details(),
        }
        self.calibration = None
        if calib_part:
            self.calibration = self.calibrate(
                self.score_samples(calib_part, "calibrating"),
                self.score_samples(held_out_defects, "scoring held-out defects"),
            )
        self.fit_info["fit_seconds"] = round(time.perf_counter() - start, 3)
        return self

    def check_geometry(self, geometry: Geometry, samples: list[Sample]) -> None:
        """Refuse, before any fitting, a geometry this method cannot fit with, or a region of interest
        that does not fit in one of ``samples`` (read from the files' headers)."""
        if geometry.tile is not None and not self.fits_on_tiles:
            raise DefectscopeError(
                f"{self.name} pairs each training image with its own features and cannot fit on tiles; "
                "use --resize keep-aspect (or square) for it"
            )
        check_region(samples, geometry)

    def check_threshold_rule(self, defects: list[Sample]) -> None:
        """Refuse, before any fitting, a threshold rule that fitting with labelled ``defects`` cannot serve."""
        if self.threshold_rule != RECALL:
            return
        n_defects = len(defects)
        if self.uses_labelled_defects:
            raise DefectscopeError(
                f"threshold_rule recall: {self.name} learns from the labelled defects it is fitted with, so they "
                "cannot also set its threshold; fit with another rule, then "
                "`defectscope calibrate RUN --defects DIR --target-recall R` with defects it has not seen"
            )
        needed = defects_needed(self.target_recall)
        if n_defects < needed:
            raise DefectscopeError(
                f"threshold_rule recall: a target recall of {self.target_recall:g} needs at least {needed} held-out "
                f"labelled defects, got {n_defects} (give them with --labelled-defects, or lower --target-recall)"
            )

    def fit_dataset(self, samples: list[Sample]) -> ImageDataset:
        """The items a method fits on for ``samples``: their views under this detector's geometry."""
        return view_dataset(samples, self.image_size, self.geometry)

    def inspect(
        self,
        samples: list[Sample],
        *,
        batch_size: int | None = None,
        native: bool = False,
        masks: bool = False,
        desc: str | None = None,
    ) -> Iterator[Inspected]:
        """Score whole image files under this detector's geometry, in order (see :func:`inspect_samples`)."""
        return inspect_samples(
            self.predict,
            samples,
            self.geometry,
            self.image_size,
            batch_size or self.batch_size,
            native=native,
            masks=masks,
            desc=desc,
        )

    def score_samples(self, samples: list[Sample], desc: str) -> np.ndarray:
        """Image anomaly scores (float64) of ``samples``, seen through the geometry as for fitting."""
        return np.array([item.score for item in self.inspect(samples, desc=desc)], dtype=np.float64)

    def calibrate(self, good_scores: np.ndarray, defect_scores: np.ndarray | None = None) -> Calibration:
        """The threshold of this detector's rule from held-out good (and defect) scores; one-line errors."""
        try:
            return calibrate(
                good_scores,
                rule=self.threshold_rule,
                false_alarm_rate=self.false_alarm_rate,
                confidence=self.false_alarm_confidence,
                sigmas=self.threshold_sigmas,
                target_recall=self.target_recall,
                defect_scores=() if defect_scores is None else defect_scores,
            )
        except ValueError as exc:
            raise DefectscopeError(str(exc)) from None

    def _start_run(self, checkpoint_dir: Path | None, resume: bool) -> None:
        """Take the checkpoint folder and resume flag of a fit; only methods trained in epochs use them."""
        if resume:
            raise DefectscopeError(f"{self.name} is not trained in epochs: there is nothing to resume")

    @torch.no_grad()
    def predict(self, batch: torch.Tensor | Batch) -> Prediction:
        """Anomaly scores and maps for a batch: a (B, 3, H, W) tensor in [0, 1] or a batch dict."""
        if not self.is_fitted:
            raise DefectscopeError(f"{type(self).__name__} is not fitted: call fit() or load() first")
        images = batch["image"] if isinstance(batch, dict) else batch
        if images.ndim == 3:
            images = images[None]
        expected = (3, self.image_size, self.image_size)
        if tuple(images.shape[1:]) != expected:
            raise DefectscopeError(
                f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(images.shape)}"
            )
        images = images.float()
        out = self._predict(images.to(self.device)) if self.engine is None else self.engine.run(images)
        recon = out.reconstructions
        return replace(
            out,
            scores=out.scores.float().cpu(),
            maps=out.maps.float().cpu(),
            threshold=self.calibration.threshold if self.calibration else None,
            reconstructions=None if recon is None else recon.float().cpu(),
        )

    # -- save / load -------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``folder`` (created if needed), atomically."""
        return save_model(self, folder)


class _PredictGraph(torch.nn.Module):
    """A method whose ``_predict`` is made of traceable tensor operations, as a module for export."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = [detector]  # a list: not a submodule; its fitted tensors become graph constants
        # its networks as submodules, so their weights become the graph's named initializers
        self.networks = torch.nn.ModuleDict({k: v for k, v in detector._modules().items() if v is not None})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.detector[0]._predict(images)
        return out.scores, out.maps


def fitted(detector: Detector, value: T | None) -> T:
    """``value`` (a fitted part of ``detector``), or a clear error when it was not fitted or loaded."""
    if value is None:
        raise DefectscopeError(f"{type(detector).__name__} is not fitted: call fit() or load() first")
    return value


def split_calibration(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of good images into a fitting part and a held-out calibration part.

    At least one image is held out when ``fraction`` > 0 and there are two or more images.
    """
    n_calib = round(len(samples) * fraction)
    if fraction > 0 and len(samples) >= 2:
        n_calib = max(1, n_calib)
    n_calib = min(n_calib, len(samples) - 1)
    order = np.random.default_rng(seed).permutation(len(samples))
    calib = set(order[:n_calib].tolist())
    return ([s for i, s in enumerate(samples) if i not in calib], [s for i, s in enumerate(samples) if i in calib])
