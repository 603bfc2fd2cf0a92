"""The contract every registered method honours, checked once for all of them on the bundled example.

Tiny settings (small images, one epoch, narrow networks) keep the whole module to a short run on
two CPU cores; how well each method detects defects is asserted in its own test file.
"""

import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from defectscope import load
from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
from defectscope.errors import DefectscopeError
from defectscope.geometry import Geometry
from defectscope.methods import METHODS, Detector
from defectscope.methods.params import ParamSpec
from defectscope.methods.trained import TrainedDetector
from helpers import DMAD_TINY

DIFFUSION = {"image_size": 32, "unet": "tiny", "epochs": 1, "steps": 2, "batch_size": 4, "time_budget": None}
TINY: dict[str, dict[str, Any]] = {
    "patchcore": {"image_size": 64},
    "padim": {"image_size": 64},
    "fyd": {"image_size": 64, "epochs": 1, "fine_epochs": 1, "batch_size": 8, "proj_dim": 16},
    "spade": {"image_size": 64},
    "dmad": DMAD_TINY,
    "reverse_distillation": {"image_size": 64, "epochs": 1, "batch_size": 8, "embed_dim": 32},
    "students": {"image_size": 64, "epochs": 1, "batch_size": 8, "n_students": 2, "width": 16},
    "mkd": {"image_size": 64, "epochs": 1, "batch_size": 8, "width": 16},
    "draem": {"image_size": 64, "epochs": 1, "batch_size": 8, "base_channels": 4, "disc_channels": 4},
    "ddad": DIFFUSION | {"da_epochs": 1, "da_images": 4},
    "glad": DIFFUSION,
}
NAMES = list(METHODS)
Fitted = Callable[[str], tuple[Detector, Path]]


def test_every_method_has_tiny_settings() -> None:
    assert sorted(TINY) == sorted(METHODS)


def _make(name: str) -> Detector:
    if name in ("ddad", "glad"):
        pytest.importorskip("diffusers", reason="diffusers is not installed (pip install defectscope[diffusion])")
    return METHODS[name](**TINY[name])


@pytest.fixture(scope="module")
def train(example_root: Path) -> list:
    return mvtec_samples(example_root, "train")[:12]


@pytest.fixture(scope="module")
def test_samples(example_root: Path) -> list:
    samples = mvtec_samples(example_root, "test")
    return [s for s in samples if s.label == 0][:2] + [s for s in samples if s.label == 1][:2]


@pytest.fixture(scope="module")
def fitted(train: list, tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """Each method fitted once (on demand) and saved; ``checkpoint_dir`` is given to all of them."""
    cache: dict[str, tuple[Detector, Path]] = {}

    def get(name: str) -> tuple[Detector, Path]:
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            det = _make(name).fit(train, checkpoint_dir=folder / "checkpoint")
            if not isinstance(det, TrainedDetector):
                assert not (folder / "checkpoint").exists()  # accepted and unused
            cache[name] = det, det.save(folder / "run")
        return cache[name]

    return get


def _images(samples: list, size: int) -> torch.Tensor:
    return next(iterate_batches(ImageDataset(samples, size), len(samples)))["image"]


@pytest.mark.parametrize("name", NAMES)
def test_fit_gives_finite_scores_and_maps_at_input_size(name: str, fitted: Fitted, test_samples: list) -> None:
    det, _ = fitted(name)
    size = det.image_size
    pred = det.predict(_images(test_samples, size))
    assert pred.scores.shape == (4,) and pred.maps.shape == (4, size, size)
    assert pred.scores.dtype == torch.float32 and pred.scores.device.type == "cpu"
    assert torch.isfinite(pred.scores).all() and torch.isfinite(pred.maps).all()
    assert det.calibration is not None and pred.threshold == det.calibration.threshold
    assert det.fit_info["n_fit_images"] + det.fit_info["n_calibration_images"] == 12
    if pred.reconstructions is not None:
        assert pred.reconstructions.shape == (4, 3, size, size)
    single = det.predict(_images(test_samples[:1], size)[0])  # one (3, H, W) image
    assert single.scores.shape == (1,)
    with pytest.raises(DefectscopeError, match="expected images of shape"):
        det.predict(torch.zeros(1, 3, size + 16, size + 16))


@pytest.mark.parametrize("name", NAMES)
def test_save_load_gives_the_same_scores_and_parameters(name: str, fitted: Fitted, test_samples: list) -> None:
    det, run = fitted(name)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == name and config["params"] == det.get_params()
    assert METHODS[name](**config["params"]).get_params() == det.get_params()
    again = load(run)
    assert type(again) is type(det) and again.get_params() == det.get_params()
    images = _images(test_samples, det.image_size)
    a, b = det.predict(images), again.predict(images)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-5, atol=1e-6)
    assert a.threshold == b.threshold


@pytest.mark.parametrize("name", NAMES)
def test_moving_to_the_cpu_keeps_the_scores(name: str, fitted: Fitted, test_samples: list) -> None:
    det, _ = fitted(name)
    images = _images(test_samples[:2], det.image_size)
    before = det.predict(images).scores
    assert det.to("cpu") is det and det.device == torch.device("cpu")
    torch.testing.assert_close(det.predict(images).scores, before)
    with pytest.raises(DefectscopeError, match="only cpu and cuda"):
        det.to("meta")


@pytest.mark.parametrize("name", NAMES)
def test_unfitted_detector_says_so(name: str) -> None:
    det = _make(name)
    size = det.image_size
    with pytest.raises(DefectscopeError, match="not fitted"):
        det.predict(torch.zeros(1, 3, size, size))
    with pytest.raises(DefectscopeError, match="not fitted"):
        det.save("never-written")
    assert not Path("never-written").exists()


@pytest.mark.parametrize("name", [n for n in NAMES if not issubclass(METHODS[n], TrainedDetector)])
def test_resume_is_refused_by_methods_not_trained_in_epochs(name: str, train: list, tmp_path: Path) -> None:
    det = _make(name)
    with pytest.raises(DefectscopeError, match=f"{name} is not trained in epochs: there is nothing to resume"):
        det.fit(train, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("name", NAMES)
def test_param_specs_cover_the_constructor_and_parse_their_defaults(name: str) -> None:
    cls = METHODS[name]
    signature = inspect.signature(cls.__init__).parameters
    specs = cls.param_specs()
    assert [s.name for s in specs] == [n for n in signature if n != "self"]
    for spec in specs:
        assert isinstance(spec, ParamSpec) and spec.default == signature[spec.name].default
        assert spec.parse(spec.format(spec.default)) == spec.default, spec.name
        if spec.choices is not None:
            assert spec.default in spec.choices
    assert cls(**{s.name: s.parse(s.format(s.default)) for s in specs}).get_params() == cls().get_params()


@pytest.mark.parametrize("name", NAMES)
def test_bad_common_parameters_are_clear_errors(name: str) -> None:
    cls = METHODS[name]
    with pytest.raises(DefectscopeError, match="batch_size must be at least 1"):
        cls(batch_size=0)
    with pytest.raises(DefectscopeError, match="threshold_sigmas must be a finite number"):
        cls(threshold_sigmas=math.nan)
    floats = [s.name for s in cls.param_specs() if s.annotation is float and s.name != "threshold_sigmas"]
    for param in floats:
        with pytest.raises(DefectscopeError, match=param):
            cls(**{param: math.inf})


def test_param_spec_parsing() -> None:
    specs = {s.name: s for s in METHODS["glad"].param_specs() + METHODS["patchcore"].param_specs()}
    assert specs["batch_size"].parse("8") == 8
    assert specs["lr"].parse("1e-3") == 0.001
    assert specs["exact_search"].parse("Yes") is True and specs["exact_search"].parse("0") is False
    assert specs["time_budget"].parse("none") is None and specs["time_budget"].parse("60") == 60.0
    assert specs["weights"].parse("null") is None and specs["weights"].parse("w.pt") == "w.pt"
    assert specs["layers"].parse("s4,s8") == ("s4", "s8") == specs["layers"].parse('["s4", "s8"]')
    assert specs["step_range"].parse("50, 300") == (50, 300)
    assert specs["distance"].parse("pixel") == "pixel" and specs["distance"].choices == ("both", "pixel", "feature")
    for spec, raw, expected in [
        ("batch_size", "8.5", "integer"),
        ("lr", "nan", "finite"),
        ("lr", "inf", "finite"),
        ("lr", "fast", "number"),
        ("exact_search", "maybe", "true or false"),
        ("time_budget", "soon", "or none"),
        ("step_range", "1,2,3", "2 comma-separated"),
        ("step_range", "1,x", "integer"),
        ("distance", "l2", "one of both, pixel, feature"),
        ("layers", "[1, 2", "JSON list"),
    ]:
        with pytest.raises(DefectscopeError, match=expected) as info:
            specs[spec].parse(raw)
        assert str(info.value).startswith(f"{spec}={raw}: expected") and "\n" not in str(info.value)


def _other_geometry(name: str) -> Geometry:
    """Tiles for every method that fits on them (a 256 px image at half scale: 3 x 3 tiles of 64 px),
    keep-aspect on a region of interest for the others."""
    if METHODS[name].fits_on_tiles:
        return Geometry(tile=64, tile_overlap=8, scale=0.5)
    return Geometry(resize="keep-aspect", roi=(0, 16, 256, 224))


@pytest.mark.parametrize("name", NAMES)
def test_every_method_fits_and_scores_under_another_geometry(
    name: str, train: list, test_samples: list, tmp_path: Path
) -> None:
    """The geometry is one layer around the contract: no method knows of it, every method works in it."""
    geometry = _other_geometry(name)
    # dmad's tiny anomaly bank needs all a dozen images and a synthetic anomaly on each of them
    images, extra = (train, {"synthetic_images": 12}) if name == "dmad" else (train[:8], {})

    def make() -> Detector:
        return METHODS[name](**(TINY[name] | extra)) if extra else _make(name)

    det = make().fit(images, checkpoint_dir=tmp_path / "checkpoint", geometry=geometry)
    if geometry.tile is not None:
        assert det.fit_info["n_fit_views"] == 9 * det.fit_info["n_fit_images"]
    items = list(det.inspect(test_samples[:2], native=True, masks=True))
    expected = (128, 128) if geometry.tile is not None else (det.image_size * 224 // 256, det.image_size)
    for item in items:
        assert item.map.shape == expected and np.isfinite(item.map).all() and np.isfinite(item.score)
        assert item.image is not None and item.image.shape[:2] == item.size == (256 if geometry.tile else 224, 256)
    again = load(det.save(tmp_path / "run"))
    assert again.geometry == geometry
    assert [i.score for i in again.inspect(test_samples[:2])] == pytest.approx([i.score for i in items], rel=1e-5)
    if isinstance(det, TrainedDetector):  # its checkpoint was trained on these views: not on others
        with pytest.raises(DefectscopeError, match="other settings"):
            make().fit(images, checkpoint_dir=tmp_path / "checkpoint", resume=True)
