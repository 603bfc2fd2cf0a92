"""The inspection service's HTTP API on a real model and a real SQLite inspection log.

Fixtures come from ``serve_helpers`` (``pytest_plugins``): a small PatchCore run
on examples/bottle_small, the app over it, and a real uvicorn server for the concurrency test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import re
import socket
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install defectscope[serve])")

import httpx
from fastapi.testclient import TestClient
from PIL import Image

from defectscope.cli import one_line
from defectscope.cli import serve as cli_serve
from defectscope.errors import DefectscopeError
from defectscope.methods import Prediction
from defectscope.runs import fit_run, predict_run
from defectscope.serve import app as app_module
from defectscope.serve.batching import MicroBatcher, ServiceBusy
from defectscope.serve.images import png_bytes
from defectscope.serve.registry import ModelRegistry, ServedModel, parse_spec
from serve_helpers import EXAMPLE, MODEL, SERVE_PARAMS, TOKEN, ServeApp, live_server, make_app, serve_process

GOOD = EXAMPLE / "test" / "good" / "000.png"
BROKEN = EXAMPLE / "test" / "broken_large" / "000.png"
INSPECT = f"/v1/models/{MODEL}/inspect"
TEST_IMAGES = sorted((EXAMPLE / "test").glob("*/*.png"))


@pytest.fixture
def client(serve_app: ServeApp) -> Iterator[TestClient]:
    with TestClient(serve_app.app, headers=serve_app.headers) as test_client:
        yield test_client


def post_file(client: TestClient, path: Path, **params: str) -> httpx.Response:
    return client.post(INSPECT, files={"file": (path.name, path.read_bytes(), "image/png")}, params=params)


def cli_error(run: Path, path: Path) -> str:
    """The one-line message ``defectscope predict RUN PATH`` prints for an image it cannot use."""
    from defectscope.cli import main

    stderr = io.StringIO()
    saved, sys.stderr = sys.stderr, stderr
    try:
        assert main(["predict", str(run), str(path)]) == 2
    finally:
        sys.stderr = saved
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("defectscope: error: "), lines
    return lines[0].removeprefix("defectscope: error: ")


def png_header(width: int, height: int) -> bytes:
    """A PNG of the given size with a valid header and no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        got = dict(re.findall(r'(\w+)="([^"]*)"', sample))
        if sample.split("{")[0] == name and all(got.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


# -- inspect ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [GOOD, BROKEN], ids=["good", "broken"])
def test_inspect_multipart_equals_predict(client: TestClient, serve_app: ServeApp, serve_run: Path, path: Path) -> None:
    response = post_file(client, path)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predict_run(serve_run, [path]).records[0]
    assert body["verdict"] == expected.verdict
    assert body["score"] == expected.score
    assert body["normalized_score"] == expected.normalized_score
    assert body["threshold"] == expected.threshold and body["rule"] == expected.rule == "conformal"
    assert body["max_pixel_score"] == expected.max_pixel_score
    assert body["model"] == MODEL and body["filename"] == path.name
    assert body["model_sha256"] == serve_app.registry.get(MODEL).sha256  # type: ignore[union-attr]
    assert set(body["timings"]) == {"decode_ms", "queue_ms", "model_ms", "store_ms", "total_ms"}
    assert body["image_url"] == f"/v1/inspections/{body['id']}/image"
    assert client.get(f"/v1/inspections/{body['id']}").json() == body  # logged as answered


def test_verdicts_follow_the_example(client: TestClient) -> None:
    assert post_file(client, BROKEN).json()["verdict"] == "anomalous"
    assert post_file(client, GOOD).json()["verdict"] == "good"


def test_inspect_raw_body_with_heatmap(client: TestClient, serve_run: Path, tmp_path: Path) -> None:
    data = BROKEN.read_bytes()
    response = client.post(
        INSPECT, content=data, params={"filename": "cam1.png", "heatmap": "true"}, headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == "cam1.png"
    assert body["score"] == predict_run(serve_run, [BROKEN]).records[0].score
    # the inline heat map is the overlay `predict --heatmaps` writes, pixel for pixel
    inline = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"]))))
    predict_run(serve_run, [BROKEN], heatmaps=tmp_path / "maps")
    np.testing.assert_array_equal(inline, np.asarray(Image.open(tmp_path / "maps" / "000_heatmap.png")))
    # the stored input is the bytes that were sent
    stored = client.get(body["image_url"])
    assert stored.status_code == 200 and stored.headers["content-type"] == "image/png"
    assert stored.content == data


def test_inspect_octet_stream_without_name(client: TestClient) -> None:
    response = client.post(INSPECT, content=GOOD.read_bytes(), headers={"content-type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    assert response.json()["filename"] is None


def test_overlay_and_heatmap_render_from_the_stored_files(client: TestClient, serve_run: Path, tmp_path: Path) -> None:
    body = post_file(client, BROKEN).json()
    overlay = client.get(body["overlay_url"])
    heatmap = client.get(body["heatmap_url"])
    assert overlay.status_code == heatmap.status_code == 200
    assert overlay.headers["content-type"] == heatmap.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(overlay.content)).convert("RGB")).astype(int)
    colours = np.asarray(Image.open(io.BytesIO(heatmap.content)).convert("RGB"))
    # the overlay at the image's own size, the map alone at the model's working resolution
    assert shown.shape == (256, 256, 3) and colours.shape == (64, 64, 3)
    predict_run(serve_run, [BROKEN], heatmaps=tmp_path / "maps")
    written = np.asarray(Image.open(tmp_path / "maps" / "000_heatmap.png").convert("RGB")).astype(int)
    # the stored map is float16: a value near a step of the 256-level colour scale may land one level
    # away (at most 4 units of a colour channel), rarely
    assert np.abs(shown - written).max() <= 4 and np.abs(shown - written).mean() < 0.05
    assert len(np.unique(colours.reshape(-1, 3), axis=0)) > 10  # a real colour map, not a flat image


# -- the log through the API ------------------------------------------------------------------------


def test_list_filter_and_paginate(client: TestClient) -> None:
    paths = [GOOD, BROKEN, EXAMPLE / "test" / "good" / "003.png", EXAMPLE / "test" / "contamination" / "000.png"]
    answered = [post_file(client, p).json() for p in paths]
    listing = client.get("/v1/inspections").json()
    assert listing["total"] == 4 and listing["limit"] == 50 and listing["offset"] == 0
    assert [i["id"] for i in listing["items"]] == [a["id"] for a in reversed(answered)]  # newest first
    page = client.get("/v1/inspections", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 4 and [i["id"] for i in page["items"]] == [answered[2]["id"], answered[1]["id"]]
    anomalous = client.get("/v1/inspections", params={"verdict": "anomalous"}).json()
    expected = {a["id"] for a in answered if a["verdict"] == "anomalous"}
    assert anomalous["total"] == len(expected) >= 1 and {i["id"] for i in anomalous["items"]} == expected
    assert client.get("/v1/inspections", params={"model": "other"}).json()["total"] == 0
    middle = answered[1]["created"]
    since = client.get("/v1/inspections", params={"since": middle}).json()
    assert {i["id"] for i in since["items"]} == {a["id"] for a in answered[1:]}
    until = client.get("/v1/inspections", params={"until": middle}).json()
    assert [i["id"] for i in until["items"]] == [answered[0]["id"]]
    bad = client.get("/v1/inspections", params={"limit": 0})
    assert bad.status_code == 422 and isinstance(bad.json()["detail"], str)
    assert client.get("/v1/inspections", params={"verdict": "maybe"}).status_code == 422


def test_models_count_inspections_by_verdict(client: TestClient) -> None:
    paths = [GOOD, BROKEN, EXAMPLE / "test" / "good" / "003.png", EXAMPLE / "test" / "contamination" / "000.png"]
    verdicts = [post_file(client, p).json()["verdict"] for p in paths]
    assert {"good", "anomalous"} <= set(verdicts)
    (entry,) = client.get("/v1/models").json()
    expected = {v: verdicts.count(v) for v in ("good", "anomalous", "error", "none")}
    assert entry["inspections"] == {**expected, "total": len(paths)}
    for verdict, n in expected.items():  # what the page asked for, one request per verdict, before
        assert client.get("/v1/inspections", params={"model": MODEL, "verdict": verdict}).json()["total"] == n
    description = client.get("/openapi.json").json()["paths"]["/v1/models"]["get"]["description"]
    assert "`inspections`" in description and '"total": n' in description


def test_feedback(client: TestClient, serve_app: ServeApp) -> None:
    body = post_file(client, BROKEN).json()
    mask = Image.new("RGBA", (300, 200))  # any size, transparent background as a page canvas draws it
    mask.paste((255, 255, 255, 255), (10, 10, 60, 40))
    encoded = "data:image/png;base64," + base64.b64encode(png_bytes(mask)).decode()
    url = f"/v1/inspections/{body['id']}/feedback"
    response = client.post(
        url, json={"kind": "confirmed_defect", "defect_type": "broken_large", "mask_png_base64": encoded}
    )
    assert response.status_code == 201, response.text
    feedback = response.json()
    assert feedback["kind"] == "confirmed_defect" and feedback["defect_type"] == "broken_large"
    stored = np.asarray(Image.open(serve_app.log.file_path(feedback["mask"])))
    assert stored.shape == (200, 300) and set(np.unique(stored)) == {0, 255}
    assert (stored == 255).sum() == 50 * 30
    again = client.get(f"/v1/inspections/{body['id']}").json()
    assert [f["id"] for f in again["feedback"]] == [feedback["id"]]
    good = post_file(client, GOOD).json()
    assert (
        client.post(f"/v1/inspections/{good['id']}/feedback", json={"kind": "false_alarm", "note": "ok"}).status_code
        == 201
    )
    counts = client.get("/v1/models").json()[0]["feedback"]
    assert counts["confirmed_defect"] == 1 and counts["false_alarm"] == 1
    for wrong in (
        {"kind": "maybe"},
        {"kind": "false_alarm", "mask_png_base64": encoded},
        {"kind": "confirmed_defect", "mask_png_base64": "not base64!"},
        {"kind": "confirmed_defect", "mask_png_base64": base64.b64encode(b"not an image").decode()},
        {"kind": "confirmed_defect", "defect_type": "../etc"},
        {"kind": "confirmed_defect", "colour": "red"},
    ):
        refused = client.post(url, json=wrong)
        assert refused.status_code == 422, (wrong, refused.text)
        assert isinstance(refused.json()["detail"], str) and "\n" not in refused.json()["detail"]


def test_models_and_healthz(client: TestClient, serve_app: ServeApp) -> None:
    model = serve_app.registry.get(MODEL)
    assert model is not None
    (entry,) = client.get("/v1/models").json()
    assert entry["name"] == MODEL and entry["method"] == "patchcore" and entry["image_size"] == 64
    assert entry["sha256"] == model.sha256 and entry["threshold"] == model.threshold
    assert entry["categories"] == ["bottle_small"] and 0 < entry["false_alarm_bound"] < 1
    assert entry["feedback"] == {"confirmed_defect": 0, "false_alarm": 0, "missed_defect": 0, "confirmed_good": 0}
    assert entry["inspections"] == {"good": 0, "anomalous": 0, "error": 0, "none": 0, "total": 0}
    health = client.get("/healthz", headers={"Authorization": ""})
    assert health.status_code == 200 and health.json() == {"status": "ok", "models": [MODEL]}


# -- security and errors ---------------------------------------------------------------------------


def test_auth(serve_app: ServeApp) -> None:
    some_id = "0" * 32
    routes = [
        ("get", "/v1/models"),
        ("post", INSPECT),
        ("get", "/v1/inspections"),
        ("get", f"/v1/inspections/{some_id}"),
        ("get", f"/v1/inspections/{some_id}/image"),
        ("get", f"/v1/inspections/{some_id}/overlay.png"),
        ("get", f"/v1/inspections/{some_id}/heatmap.png"),
        ("post", f"/v1/inspections/{some_id}/feedback"),
        ("get", "/metrics"),
    ]
    with TestClient(serve_app.app) as anonymous:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": TOKEN},
            {"Authorization": "Basic x"},
        ):
            for method, url in routes:
                response = anonymous.request(method, url, headers=headers, content=GOOD.read_bytes())
                assert response.status_code == 401, (method, url, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert isinstance(response.json()["detail"], str)
        assert serve_app.log.list()[1] == 0  # nothing was inspected
        assert anonymous.get("/healthz").status_code == 200
        page = anonymous.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert anonymous.get("/openapi.json").json()["paths"][INSPECT.replace(MODEL, "{name}")]["post"]


def test_no_auth_app(serve_registry: ModelRegistry, tmp_path: Path) -> None:
    served = make_app(serve_registry, tmp_path, token=None)
    try:
        with TestClient(served.app) as anonymous:
            assert anonymous.get("/v1/models").status_code == 200
    finally:
        served.log.close()


def test_not_found(client: TestClient) -> None:
    missing = client.post("/v1/models/nope/inspect", content=GOOD.read_bytes())
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    for url in ("/v1/inspections/" + "0" * 32, "/v1/inspections/../../etc/passwd", "/v1/inspections/" + "a" * 500):
        assert client.get(url).status_code == 404, url
    for tail in ("image", "overlay.png", "heatmap.png"):
        assert client.get(f"/v1/inspections/{'0' * 32}/{tail}").status_code == 404
    assert client.post(f"/v1/inspections/{'0' * 32}/feedback", json={"kind": "false_alarm"}).status_code == 404
    assert client.get("/v1/nothing").status_code == 404


def test_upload_limit(serve_registry: ModelRegistry, tmp_path: Path) -> None:
    served = make_app(serve_registry, tmp_path, max_upload_bytes=20_000)
    data = GOOD.read_bytes()
    assert len(data) > 20_000

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body is read
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]

    try:
        with TestClient(served.app, headers=served.headers) as client:
            for response in (
                client.post(INSPECT, content=data, headers={"content-type": "image/png"}),
                client.post(INSPECT, content=chunks(), headers={"content-type": "image/png"}),
                client.post(INSPECT, files={"file": ("big.png", data, "image/png")}),
                client.post(f"/v1/inspections/{'0' * 32}/feedback", json={"kind": "false_alarm", "note": "x" * 30_000}),
            ):
                assert response.status_code == 413, response.text
                assert "over the limit of 20000" in response.json()["detail"]
            assert served.log.list()[1] == 0
            small = np.asarray(Image.open(GOOD).resize((32, 32)))
            assert client.post(INSPECT, content=png_bytes(Image.fromarray(small))).status_code == 200
    finally:
        served.log.close()


HOSTILE = {
    "garbage.png": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "empty.png": b"",
    "truncated.png": BROKEN.read_bytes()[: len(BROKEN.read_bytes()) // 2],
    "huge.png": png_header(100_000, 100_000),
    "notes.png": b"this is a text file, not an image\n" * 20,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_images_get_the_cli_message(
    client: TestClient, serve_app: ServeApp, serve_run: Path, tmp_path: Path, name: str
) -> None:
    data = HOSTILE[name]
    on_disk = tmp_path / name
    on_disk.write_bytes(data)
    expected = cli_error(serve_run, on_disk).replace(str(on_disk), name)
    assert expected.startswith(f"{name}: ")
    as_file = client.post(INSPECT, files={"file": (name, data, "image/png")})
    as_body = client.post(INSPECT, content=data, params={"filename": name}, headers={"content-type": "image/png"})
    for response in (as_file, as_body):
        assert response.status_code == 422, response.text
        assert response.json() == {"detail": expected}
    unnamed = client.post(INSPECT, content=data, headers={"content-type": "image/png"})
    assert unnamed.status_code == 422 and unnamed.json()["detail"] == expected.replace(name, "upload", 1)
    assert serve_app.log.list()[1] == 0


def test_hostile_requests(client: TestClient) -> None:
    no_file = client.post(INSPECT, files={"other": ("x.png", GOOD.read_bytes(), "image/png")})
    assert no_file.status_code == 422 and "'file'" in no_file.json()["detail"]
    broken = client.post(INSPECT, content=b"--xx\r\nnonsense", headers={"content-type": "multipart/form-data"})
    assert broken.status_code in (400, 422) and isinstance(broken.json()["detail"], str)
    control = client.post(INSPECT, content=b"junk", params={"filename": "../../a\nb\x1b[31m.png"})
    assert control.status_code == 422 and control.json()["detail"].startswith("ab[31m.png: ")
    assert client.post(f"/v1/inspections/{'0' * 32}/feedback", content=b"{not json").status_code == 422


def test_page_missing(serve_registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "PAGE_DIR", tmp_path / "no-page")
    served = make_app(serve_registry, tmp_path)
    try:
        with TestClient(served.app) as anonymous:
            page = anonymous.get("/")
            assert page.status_code == 200 and "not installed" in page.text
            assert anonymous.get("/static/app.js").status_code == 404
    finally:
        served.log.close()


def test_page_files_are_served(client: TestClient) -> None:
    files = [p for p in app_module.PAGE_DIR.iterdir() if p.is_file()] if app_module.PAGE_DIR.is_dir() else []
    if not files:
        pytest.skip("the operator page is not in this checkout")
    for path in files:
        response = client.get(f"/static/{path.name}", headers={"Authorization": ""})
        assert response.status_code == 200 and response.content == path.read_bytes()
    assert client.get("/static/../app.py").status_code == 404


def test_cors_is_off_by_default(client: TestClient, serve_registry: ModelRegistry, tmp_path: Path) -> None:
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options(INSPECT, headers=preflight).headers
    assert (
        "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": "http://evil.example"}).headers
    )
    served = make_app(serve_registry, tmp_path / "cors", cors_origins=("http://line.local",))
    try:
        with TestClient(served.app, headers=served.headers) as other:
            answer = other.get("/v1/models", headers={"Origin": "http://line.local"})
            assert answer.headers["access-control-allow-origin"] == "http://line.local"
    finally:
        served.log.close()


def test_metrics(client: TestClient) -> None:
    post_file(client, GOOD)
    post_file(client, BROKEN)
    client.post(INSPECT, content=b"junk")
    text = client.get("/metrics").text
    route = "/v1/models/{name}/inspect"
    assert metric(text, "defectscope_requests_total", route=route, status="200") == 2
    assert metric(text, "defectscope_requests_total", route=route, status="422") == 1
    assert metric(text, "defectscope_request_seconds_count", route=route) == 3
    assert metric(text, "defectscope_verdicts_total", model=MODEL, verdict="good") == 1
    assert metric(text, "defectscope_verdicts_total", model=MODEL, verdict="anomalous") == 1
    assert metric(text, "defectscope_batch_size_sum", model=MODEL) == 2


# -- batching --------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched(serve_registry: ModelRegistry, serve_run: Path, tmp_path: Path) -> None:
    images = TEST_IMAGES[:16]
    assert len(images) == 16
    expected = {r.path: r for r in predict_run(serve_run, images).records}
    served = make_app(serve_registry, tmp_path, max_wait_ms=200.0)
    results: dict[Path, httpx.Response] = {}
    barrier = threading.Barrier(len(images))
    try:
        with live_server(served) as live:

            def client_thread(path: Path) -> None:
                with httpx.Client(base_url=live.url, headers=live.headers, timeout=60) as http:
                    data = path.read_bytes()
                    barrier.wait()
                    results[path] = http.post(INSPECT, files={"file": (path.name, data, "image/png")})

            threads = [threading.Thread(target=client_thread, args=(p,)) for p in images]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            for path in images:
                response = results[path]
                assert response.status_code == 200, response.text
                body = response.json()
                want = expected[str(path)]
                assert body["filename"] == path.name and body["verdict"] == want.verdict
                assert body["score"] == pytest.approx(want.score, rel=1e-5, abs=1e-6)
            with httpx.Client(base_url=live.url, headers=live.headers) as http:
                text = http.get("/metrics").text
        assert metric(text, "defectscope_batch_size_sum", model=MODEL) == 16
        assert metric(text, "defectscope_batch_size_count", model=MODEL) < 16  # some batch held several
        assert served.log.list()[1] == 16  # every answered inspection is in the log
    finally:
        served.log.close()


def test_micro_batcher_queue_is_bounded() -> None:
    release = threading.Event()
    calls: list[int] = []

    def slow_predict(images: torch.Tensor) -> Prediction:
        calls.append(len(images))
        release.wait(10)
        return Prediction(scores=images.mean(dim=(1, 2, 3)), maps=images[:, 0])

    async def scenario() -> None:
        batcher = MicroBatcher(slow_predict, max_batch=1, max_wait_ms=0, queue_size=1, name="slow")
        first = asyncio.ensure_future(batcher.submit(torch.zeros(3, 4, 4)))
        await asyncio.sleep(0.1)  # the worker took the first into the model
        second = asyncio.ensure_future(batcher.submit(torch.ones(3, 4, 4)))
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceBusy, match="1 requests are already waiting"):
            await batcher.submit(torch.ones(3, 4, 4))
        release.set()
        assert (await first).score == 0.0 and (await second).score == 1.0
        await batcher.stop()

    asyncio.run(scenario())
    assert calls == [1, 1]


def test_micro_batcher_groups_waiting_requests() -> None:
    def predict(images: torch.Tensor) -> Prediction:
        return Prediction(scores=images.mean(dim=(1, 2, 3)), maps=images[:, 0])

    sizes: list[int] = []

    async def scenario() -> list[float]:
        batcher = MicroBatcher(
            predict, max_batch=4, max_wait_ms=50, queue_size=16, on_batch=lambda n, _s: sizes.append(n)
        )
        results = await asyncio.gather(*(batcher.submit(torch.full((3, 2, 2), float(i))) for i in range(10)))
        await batcher.stop()
        return [r.score for r in results]

    assert asyncio.run(scenario()) == [float(i) for i in range(10)]
    assert sizes == [4, 4, 2]


# -- registry --------------------------------------------------------------------------------------


def test_registry_names(serve_run: Path, tmp_path: Path) -> None:
    assert parse_spec(f"{serve_run}=line1") == (serve_run, "line1")
    assert parse_spec(str(serve_run)) == (serve_run, None)
    two = ModelRegistry.from_specs([str(serve_run), f"{serve_run}=line2"])
    assert two.names == [MODEL, "line2"] and two.get(MODEL).sha256 == two.get("line2").sha256  # type: ignore[union-attr]
    with pytest.raises(DefectscopeError, match="already taken"):
        ModelRegistry.from_specs([str(serve_run), f"{serve_run}={MODEL}"])
    with pytest.raises(DefectscopeError, match="cannot be a model name"):
        ModelRegistry.from_specs([f"{serve_run}=a/b"])
    with pytest.raises(DefectscopeError, match="run folder not found"):
        ServedModel.load(tmp_path / "missing")


# -- the command -----------------------------------------------------------------------------------


def serve_main(argv: list[str]) -> tuple[int, str]:
    """``defectscope serve ARGV`` in this process, as ``defectscope.cli.main`` runs a command: (status, stderr)."""
    parser = argparse.ArgumentParser(prog="defectscope")
    cli_serve.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *argv])
    stderr = io.StringIO()
    saved, sys.stderr = sys.stderr, stderr
    try:
        status = int(args.func(args))
    except DefectscopeError as exc:
        print(f"defectscope: error: {one_line(str(exc))}", file=sys.stderr)
        status = 2
    finally:
        sys.stderr = saved
    return status, stderr.getvalue()


def test_serve_refuses_before_binding(serve_run: Path, tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    empty = tmp_path / "empty-token"
    empty.write_text("\n \n")
    cases = {
        "--no-auth is only allowed on a loopback": [str(serve_run), "--no-auth", "--host", "0.0.0.0"],
        "cannot read the token file": [str(serve_run), "--token-file", str(tmp_path / "nope")],
        "token file is empty": [str(serve_run), "--token-file", str(empty)],
        "run folder not found": [str(tmp_path / "no-run"), "--no-auth"],
        "already taken": [str(serve_run), f"{serve_run}={MODEL}", "--no-auth"],
    }
    for fragment, argv in cases.items():
        status, err = serve_main([*argv, *data])
        assert status == 2 and fragment in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "data").exists()  # nothing was made before the checks passed
    taken = socket_in_use()
    try:
        status, err = serve_main([str(serve_run), "--no-auth", "--port", str(taken.getsockname()[1]), *data])
    finally:
        taken.close()
    assert status == 2 and "cannot listen there" in err and err.count("\n") == 1, err
    assert not (tmp_path / "data").exists()


def socket_in_use() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_serve_command_end_to_end(serve_run: Path, tmp_path: Path) -> None:
    """`defectscope serve` in its own process: prints the URL, makes a token, serves, stops cleanly on SIGTERM."""
    data_dir = tmp_path / "data"
    with serve_process([f"{serve_run}=line"], data_dir) as served:
        assert (data_dir / "token").stat().st_mode & 0o077 == 0
        assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok", "models": ["line"]}
        assert httpx.get(f"{served.url}/v1/models").status_code == 401
        answer = httpx.post(f"{served.url}/v1/models/line/inspect", content=BROKEN.read_bytes(), headers=served.headers)
        assert answer.status_code == 200 and answer.json()["verdict"] == "anomalous"
        assert (data_dir / "inspections.db").is_file()
        assert served.stop() == 0  # what a service manager sends: drain, close the log, status 0
        assert served.stderr[-1].strip() == "stopped", served.stderr


def test_model_without_threshold(tmp_path: Path) -> None:
    run = tmp_path / "uncalibrated"
    fit_run(EXAMPLE, run, params={**SERVE_PARAMS, "calibration_fraction": 0.0})
    served = make_app(ModelRegistry.from_specs([str(run)]), tmp_path)
    try:
        with TestClient(served.app, headers=served.headers) as client:
            body = client.post("/v1/models/uncalibrated/inspect", content=BROKEN.read_bytes()).json()
            expected = predict_run(run, [BROKEN]).records[0]
            assert expected.verdict is None and body["score"] == expected.score
            assert body["verdict"] == "none" and body["threshold"] is None and body["normalized_score"] is None
            assert client.get(body["overlay_url"]).status_code == 200
            assert client.get("/v1/inspections", params={"verdict": "none"}).json()["total"] == 1
            (entry,) = client.get("/v1/models").json()
            assert entry["inspections"] == {"good": 0, "anomalous": 0, "error": 0, "none": 1, "total": 1}
            text = client.get("/metrics").text
            assert metric(text, "defectscope_verdicts_total", model="uncalibrated", verdict="none") == 1
    finally:
        served.log.close()


def test_docs_work_offline(serve_app: ServeApp) -> None:
    with TestClient(serve_app.app) as anonymous:
        docs = anonymous.get("/docs")
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        assert "/v1/models/{name}/inspect" in docs.text and "multipart/form-data" in docs.text
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", docs.text)  # nothing from another host
        assert "/v1/inspections/{inspection_id}/feedback" in anonymous.get("/openapi.json").json()["paths"]


def test_no_auth_needs_a_loopback_host() -> None:
    assert all(cli_serve.is_loopback(host) for host in ("127.0.0.1", "127.8.0.1", "::1", "localhost"))
    assert not any(cli_serve.is_loopback(host) for host in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.10"))
