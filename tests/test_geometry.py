"""The input geometry layer: tiles, keep-aspect, regions of interest, stitching and the saved model."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.data import Sample, mvtec_samples
from defectscope.errors import DataError, DefectscopeError, ModelFileError
from defectscope.geometry import Geometry, parse_roi
from defectscope.geometry.inspect import assemble, inspect_samples
from defectscope.geometry.sources import ViewDataset, open_sample, view_dataset
from defectscope.geometry.views import Views, blend_weights, tile_starts
from defectscope.methods import DMAD, PaDiM, load
from helpers import raises_naming


@dataclass
class _Pred:
    scores: torch.Tensor
    maps: torch.Tensor
    reconstructions: torch.Tensor | None = None


def grey_predict(views: torch.Tensor) -> _Pred:
    """A detector whose map is each view's grey level and whose score is the view's brightest pixel."""
    maps = views.mean(dim=1)
    return _Pred(maps.flatten(1).max(dim=1).values, maps, views)


def _image(tmp_path: Path, height: int, width: int, name: str = "part.png", seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return path


def _sample(path: Path, mask: Path | None = None) -> Sample:
    return Sample(path, 1 if mask else 0, "scratch" if mask else "good", mask, "part")


@pytest.mark.parametrize("length,tile,overlap", [(900, 256, 32), (1250, 256, 0), (257, 256, 32), (256, 256, 32)])
def test_tiles_cover_the_image_with_the_asked_overlap(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length  # the last tile ends at the edge, never past it
    steps = np.diff(starts)
    assert (steps <= tile - overlap).all() and (steps > 0).all()
    assert tile_starts(100, 256, 32) == [0]  # shorter than a tile: one (padded) tile


def test_blend_weights_fall_off_across_the_overlap_only() -> None:
    w = blend_weights(64, 8)
    assert w[32, 32] == 1 and w[0, 32] == pytest.approx(1 / 9) and w[8, 32] == 1
    assert torch.equal(blend_weights(64, 0), torch.ones(64, 64))


@pytest.mark.parametrize("height,width,scale", [(300, 700, 1.0), (90, 500, 1.0), (600, 420, 0.5)])
def test_stitched_tiles_give_back_the_map_of_the_whole_image(
    tmp_path: Path, height: int, width: int, scale: float
) -> None:
    """A detector whose map is a pixel-wise function of the image: stitched tiles must equal that
    function of the whole (scaled) image, at every pixel, with the overlaps blended."""
    path = _image(tmp_path, height, width)
    geometry = Geometry(tile=64, tile_overlap=16, scale=scale)
    opened = open_sample(_sample(path), geometry, 64, native=True)
    assert len(opened.views) > 1
    [done] = assemble(grey_predict, 5, [(0, opened.views)])  # 5: tiles split across batches
    expected = (
        torch.from_numpy(opened.views.pixels).float().div(255).mean(dim=0)[: done.map.shape[0], : done.map.shape[1]]
    )
    assert done.map.shape == (round(height * scale), round(width * scale))
    np.testing.assert_allclose(done.map, expected.numpy(), atol=1e-5)
    assert done.score == pytest.approx(float(expected.max()), abs=1e-6)
    assert opened.image is not None and opened.image.shape == (height, width, 3)
    assert done.reconstruction is not None and done.reconstruction.shape == (*done.map.shape, 3)


def test_keep_aspect_pads_the_short_side_and_cuts_the_padding_off(tmp_path: Path) -> None:
    path = _image(tmp_path, 100, 400)
    views = open_sample(_sample(path), Geometry(resize="keep-aspect"), 64).views
    assert len(views) == 1 and views.box == (24, 0, 16, 64)  # 16 rows of content, centred
    [done] = assemble(grey_predict, 4, [(0, views)])
    assert done.map.shape == (16, 64)
    content = torch.from_numpy(views.pixels[:, 24:40]).float().div(255).mean(dim=0)
    np.testing.assert_allclose(done.map, content.numpy(), atol=1e-6)
    # the padding mirrors the content, so no artificial edge reaches the network
    np.testing.assert_array_equal(views.pixels[:, 23], views.pixels[:, 25])


def test_region_of_interest_crops_image_mask_and_map(tmp_path: Path) -> None:
    path = _image(tmp_path, 200, 300)
    mask = np.zeros((200, 300), dtype=np.uint8)
    mask[50:60, 100:110] = 255
    mask_path = tmp_path / "part_mask.png"
    Image.fromarray(mask).save(mask_path)
    geometry = Geometry(roi=(90, 40, 64, 32))
    opened = open_sample(_sample(path, mask_path), geometry, 64, native=True, masks=True)
    assert opened.image is not None and opened.mask is not None
    np.testing.assert_array_equal(opened.image, np.asarray(Image.open(path))[40:72, 90:154])
    assert opened.mask.shape == (32, 64) and opened.mask.sum() == 10 * 10
    item = ViewDataset([_sample(path, mask_path)], 64, geometry)[0]
    assert item["mask"].shape == (64, 64) and item["mask"].any()
    with raises_naming(path, "region of interest", "300x200"):
        open_sample(_sample(path), Geometry(roi=(250, 0, 100, 10)), 64)


def test_fit_items_are_tiles_with_their_masks(tmp_path: Path) -> None:
    path = _image(tmp_path, 130, 250)
    mask = np.zeros((130, 250), dtype=np.uint8)
    mask[:, 240:] = 255  # a defect along the right edge: only the last column of tiles holds it
    mask_path = tmp_path / "part_mask.png"
    Image.fromarray(mask).save(mask_path)
    dataset = view_dataset([_sample(path, mask_path), _sample(path)], 64, Geometry(tile=64, tile_overlap=0))
    assert isinstance(dataset, ViewDataset)
    per_image = len(tile_starts(130, 64, 0)) * len(tile_starts(250, 64, 0))
    assert len(dataset) == 2 * per_image and len(dataset.samples) == len(dataset)
    with_defect = [i for i in range(per_image) if dataset[i]["mask"].any()]
    assert len(with_defect) == len(tile_starts(130, 64, 0))
    assert all(dataset[i]["image"].shape == (3, 64, 64) for i in (0, per_image, len(dataset) - 1))


def test_geometry_settings_are_checked() -> None:
    for bad, fragment in [
        (dict(tile=16), "at least 32"),
        (dict(tile=64, tile_overlap=40), "half the tile"),
        (dict(tile=64, scale=0.0), "scale"),
        (dict(scale=0.5), "tile size"),
        (dict(tile=64, resize="keep-aspect"), "keep-aspect"),
        (dict(roi=(0, 0, 0, 5)), "W and H"),
        (dict(resize="stretch"), "resize"),
    ]:
        with pytest.raises(DefectscopeError, match=fragment):
            Geometry(**bad)  # type: ignore[arg-type]
    assert parse_roi(" 1, 2,3 ,4") == (1, 2, 3, 4)
    with pytest.raises(DefectscopeError, match="X,Y,W,H"):
        parse_roi("1,2,3")
    assert Geometry.from_json(Geometry(tile=64, scale=0.5, roi=(1, 2, 3, 4)).to_json()) == Geometry(
        tile=64, scale=0.5, roi=(1, 2, 3, 4)
    )


def test_a_tiled_model_saves_loads_and_scores_as_fitted(tmp_path: Path, mtd_root: Path) -> None:
    train = mvtec_samples(mtd_root, "train")[:24]
    test = [s for s in mvtec_samples(mtd_root, "test") if s.mask_path is not None][:3]
    geometry = Geometry(tile=64, tile_overlap=8, scale=0.5)
    detector = PaDiM(image_size=64, n_channels=32).fit(train, geometry=geometry)
    assert detector.fit_info["n_fit_views"] > detector.fit_info["n_fit_images"]
    detector.save(tmp_path / "run")
    loaded = load(tmp_path / "run")
    assert loaded.geometry == geometry
    first = [i.score for i in detector.inspect(test)]
    again = list(loaded.inspect(test, native=True, masks=True))
    assert [i.score for i in again] == first
    for item in again:
        height, width = item.size
        assert item.map.shape == (round(height * 0.5), round(width * 0.5))
        assert item.mask is not None and item.mask.shape == (height, width)
    # the threshold was set on held-out good images seen through the same tiles
    held_out = detector.calibration
    assert held_out is not None and held_out.n_images == detector.fit_info["n_calibration_images"]


def test_a_tampered_geometry_is_refused_on_load(tmp_path: Path, mtd_root: Path) -> None:
    detector = PaDiM(image_size=64, n_channels=16).fit(mvtec_samples(mtd_root, "train")[:6], geometry=Geometry(tile=64))
    detector.save(tmp_path / "run")
    config_path = tmp_path / "run" / "config.json"
    config = json.loads(config_path.read_text())
    config["geometry"]["tile"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="geometry"):
        load(tmp_path / "run")


def test_dmad_refuses_tiles_before_any_work(mtd_root: Path) -> None:
    with pytest.raises(DefectscopeError, match="cannot fit on tiles"):
        DMAD(image_size=64).fit(mvtec_samples(mtd_root, "train")[:4], geometry=Geometry(tile=64))


def test_inspect_samples_names_the_unreadable_file(tmp_path: Path) -> None:
    good = _image(tmp_path, 80, 120)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with raises_naming(broken, "cannot read image"):
        list(inspect_samples(grey_predict, [_sample(good), _sample(broken)], Geometry(tile=64), 64, 4))


def test_views_come_a_few_at_a_time(tmp_path: Path) -> None:
    """A long image's tiles are made per batch, never all at once."""
    path = _image(tmp_path, 64, 2000)
    views = open_sample(_sample(path), Geometry(tile=64, tile_overlap=0), 64).views
    sizes: list[int] = []

    def predict(batch: torch.Tensor) -> _Pred:
        sizes.append(len(batch))
        return grey_predict(batch)

    [done] = assemble(predict, 4, [(0, views)])
    assert isinstance(views, Views) and len(views) == 32 and max(sizes) == 4 and sum(sizes) == 32
    assert done.map.shape == (64, 2000)
    with pytest.raises(DataError):
        open_sample(_sample(tmp_path / "missing.png"), Geometry(tile=64), 64)


@pytest.mark.parametrize(
    "geometry", [Geometry(tile=64, tile_overlap=16, roi=(20, 10, 200, 160)), Geometry(resize="keep-aspect")]
)
def test_the_service_sees_images_as_predict_does(tmp_path: Path, geometry: Geometry) -> None:
    """An upload to a tiled (or keep-aspect) model gets the score `predict` gives the same file, and its
    logged overlay covers the region of interest in its own aspect ratio."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install defectscope[serve])")
    from fastapi.testclient import TestClient

    from defectscope.runs import fit_run, predict_run
    from defectscope.serve.registry import ModelRegistry
    from serve_helpers import EXAMPLE, SERVE_PARAMS, make_app

    run = tmp_path / "parts"
    fit_run(EXAMPLE, run, params=dict(SERVE_PARAMS), geometry=geometry)
    image = EXAMPLE / "test" / "broken_large" / "000.png"
    expected = predict_run(run, [image]).records[0]
    served = make_app(ModelRegistry.from_specs([str(run)]), tmp_path / "serve", token=None)
    try:
        with TestClient(served.app) as client:
            sent = client.post(
                "/v1/models/parts/inspect", files={"file": (image.name, image.read_bytes(), "image/png")}
            )
            assert sent.status_code == 200, sent.text
            body = sent.json()
            assert body["score"] == pytest.approx(expected.score, rel=1e-6) and body["verdict"] == expected.verdict
            overlay = client.get(f"/v1/inspections/{body['id']}/overlay.png")
            assert overlay.status_code == 200
            shown = Image.open(io.BytesIO(overlay.content))
            width, height = (200, 160) if geometry.roi else Image.open(image).size
            assert abs(shown.width / shown.height - width / height) < 0.05
            models = client.get("/v1/models").json()
            assert models[0]["geometry"] == geometry.to_json()
    finally:
        served.log.close()


@pytest.mark.parametrize("geometry", [Geometry(), Geometry(resize="keep-aspect"), Geometry(tile=64, tile_overlap=16)])
def test_keep_aspect_and_tiles_score_by_the_assembled_map(tmp_path: Path, geometry: Geometry) -> None:
    """The padding and the tile edges never decide an image score; the square resize keeps the method's."""
    path = _image(tmp_path, 60, 150)

    def edge_predict(views: torch.Tensor) -> _Pred:
        maps = views.mean(dim=1)
        maps[:, :2, :] = 5.0  # a hot top edge of every view: in the padding or weighted down in overlaps
        return _Pred(maps.flatten(1).max(dim=1).values, maps)

    [done] = assemble(edge_predict, 8, [(0, open_sample(_sample(path), geometry, 64).views)])
    if geometry == Geometry():
        assert done.score == 5.0
    else:
        assert done.score == float(done.map.max())
        if geometry.resize == "keep-aspect":
            assert done.score < 1.0  # the hot rows were padding, cut off with it

    def nan_predict(views: torch.Tensor) -> _Pred:
        pred = grey_predict(views)
        pred.scores[0] = float("nan")
        return pred

    [broken] = assemble(nan_predict, 8, [(0, open_sample(_sample(path), geometry, 64).views)])
    assert np.isnan(broken.score)  # an untrusted view score is never hidden by the map
