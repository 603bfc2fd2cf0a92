"""The operator page in a real browser (Playwright driving Debian's chromium) against the real app under uvicorn.

upload two images -> both results shown with the API's verdicts -> rows in the history -> "confirm defect"
with a mask drawn on the image -> the feedback is in the log -> ``export_feedback`` writes the defect and
its mask in MVTec layout. Set ``DEFECTSCOPE_PAGE_SCREENSHOTS=DIR`` to keep screenshots of the page.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(
        f"no browser for the page test: {CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install defectscope[serve])")

if TYPE_CHECKING:
    from serve_helpers import LiveServer


MODEL = "bottle"  # the model of serve_helpers' fixtures
EXAMPLE_TEST = Path(__file__).resolve().parents[1] / "examples" / "bottle_small" / "test"
GOOD = EXAMPLE_TEST / "good" / "003.png"
BROKEN = EXAMPLE_TEST / "broken_large" / "000.png"
SHOTS = os.environ.get("DEFECTSCOPE_PAGE_SCREENSHOTS")
TIMEOUT_MS = 30_000


def _shot(page: Any, name: str, **kwargs: Any) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"page-{name}.png"), **kwargs)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []  # script errors and what the page's Content-Security-Policy blocked
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if msg.type == "error" and "Content Security Policy" in msg.text else None,
    )
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _api_inspect(client: Any, path: Path | None = None, *, data: bytes | None = None, name: str = "") -> Any:
    content = path.read_bytes() if path is not None else data
    return client.post(
        f"/v1/models/{MODEL}/inspect", files={"file": (path.name if path is not None else name, content, "image/png")}
    )


def _open_page(page: Any, live: LiveServer) -> None:
    page.goto(f"{live.url}/?token={live.token}")
    page.wait_for_selector(f"#models input[value='{MODEL}']")
    assert "token" not in page.url  # read once, then taken out of the address bar
    assert page.evaluate("sessionStorage.getItem('defectscope.token')") == live.token


def test_upload_history_feedback_export(page: Any, live_serve: LiveServer, tmp_path: Path) -> None:
    from defectscope.serve.export import export_feedback

    live = live_serve
    with httpx.Client(base_url=live.url, headers=live.headers, timeout=30) as client:
        # What the API itself says about the two files (logged too: the history holds four rows at the end).
        expected = {}
        for path in (GOOD, BROKEN):
            resp = _api_inspect(client, path)
            assert resp.status_code == 200, resp.text
            expected[path.name] = resp.json()["verdict"]
        assert set(expected.values()) <= {"good", "anomalous"}

        _open_page(page, live)
        page.check(f"#models input[value='{MODEL}']")
        page.set_input_files("#files", [str(GOOD), str(BROKEN)])
        page.wait_for_function("() => document.querySelectorAll('#results .card[data-id]').length === 2")

        ids = {}
        for path in (GOOD, BROKEN):
            card = page.locator(f"#results .card[data-filename='{path.name}']")
            ids[path.name] = card.get_attribute("data-id")
            assert card.get_attribute("data-verdict") == expected[path.name]
            assert card.locator(".verdict").inner_text().strip().lower() == expected[path.name]
            shown = client.get(f"/v1/inspections/{ids[path.name]}").json()
            assert shown["verdict"] == expected[path.name] and shown["filename"] == path.name
            assert (shown["rule"] or "—") in card.locator(".nums").inner_text()
            # the overlay came through the token-carrying fetch as a blob URL
            page.wait_for_function(
                "(id) => { const img = document.querySelector(`.card[data-id='${id}'] .thumb img`);"
                " return img && img.src.startsWith('blob:') && img.complete && img.naturalWidth > 0; }",
                arg=ids[path.name],
            )
        assert len(set(ids.values())) == 2

        # both page uploads appear in the history table (which also holds the two API calls above)
        for name, inspection_id in ids.items():
            row = page.locator(f"#history tbody tr[data-id='{inspection_id}']")
            row.wait_for()
            assert row.locator(".pill").inner_text() == expected[name]
        page.wait_for_function("() => document.querySelector('#page-info').textContent.endsWith('of 4')")
        # the model's counters (from /v1/models) count the four inspections by verdict
        for verdict in ("good", "anomalous", "error"):
            n = 2 * list(expected.values()).count(verdict)
            page.locator(
                f".model[data-model='{MODEL}'] .model-counts .count[data-verdict='{verdict}']",
                has_text=f"{n} {verdict}",
            ).wait_for()
        # thumbnails load when their rows scroll into view
        page.locator("#history").scroll_into_view_if_needed()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#history tbody img')].every((img) => img.src.startsWith('blob:')"
            " && img.complete && img.naturalWidth > 0)"
        )
        page.evaluate("window.scrollTo(0, 0)")
        _shot(page, "upload", full_page=True)

        # "confirm defect" on the broken bottle, with a mask stroke drawn on the image in the modal
        defect_id = ids[BROKEN.name]
        page.locator(f".card[data-id='{defect_id}'] button.thumb").click()
        page.wait_for_selector("#modal[open]")
        page.wait_for_function(
            "() => { const img = document.getElementById('m-image'), c = document.getElementById('m-canvas');"
            " return img.complete && img.naturalWidth > 0 && c.width === img.naturalWidth; }"
        )
        box = page.locator("#m-canvas").bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + 0.4 * box["height"])
        page.mouse.down()
        for step in range(1, 11):
            page.mouse.move(box["x"] + (0.3 + 0.03 * step) * box["width"], box["y"] + 0.4 * box["height"])
        page.mouse.up()
        page.fill("#m-feedback input[name=defect_type]", "broken_large")
        page.click("#m-feedback button[data-kind=confirmed_defect]")
        page.locator("#m-feedback .fb-status", has_text="Recorded: confirmed defect").wait_for()
        page.locator("#m-recorded li[data-kind=confirmed_defect]").wait_for()
        _shot(page, "modal")
        page.click("#modal-close")

        recorded = client.get(f"/v1/inspections/{defect_id}").json()["feedback"]
        assert [f["kind"] for f in recorded] == ["confirmed_defect"]
        assert recorded[0]["defect_type"] == "broken_large" and recorded[0]["mask"]
        mask = np.asarray(Image.open(live.served.log.file_path(recorded[0]["mask"])).convert("L")) > 127
        with Image.open(BROKEN) as original:
            assert mask.shape == (original.height, original.width)
        assert 0.001 < mask.mean() < 0.2  # the stroke, not an empty or a full mask
        rows, cols = np.nonzero(mask)
        assert 0.3 < rows.mean() / mask.shape[0] < 0.5 and 0.3 < cols.mean() / mask.shape[1] < 0.7

        # the card and the history row show what was recorded, the model counter what waits for export
        card = page.locator(f".card[data-id='{defect_id}']")
        assert card.locator("button[data-kind=confirmed_defect]").get_attribute("aria-pressed") == "true"
        page.locator(f"#history tbody tr[data-id='{defect_id}'] .fb-cell", has_text="confirmed defect").wait_for()
        page.locator(f".model[data-model='{MODEL}'] .model-feedback", has_text="1 confirmed defect").wait_for()
        # the history filters go to the API: verdict, then a time range that ends before these inspections
        page.select_option("#f-verdict", "anomalous")
        page.wait_for_function("() => document.querySelector('#page-info').textContent.endsWith('of 2')")
        assert set(page.locator("#history tbody tr").evaluate_all("rows => rows.map(r => r.dataset.verdict)")) == {
            "anomalous"
        }
        page.fill("#f-until", "2001-01-01T00:00:00")
        page.click("#filters button[type=submit]")
        page.wait_for_function("() => document.querySelector('#page-info').textContent === '0 of 0'")
        assert page.locator("#history tbody tr").count() == 0
        page.click("#filters button[type=reset]")
        page.wait_for_function("() => document.querySelector('#page-info').textContent.endsWith('of 4')")

        waiting = client.get("/v1/models").json()[0]["feedback"]
        assert {kind: n for kind, n in waiting.items() if n} == {"confirmed_defect": 1}

    # the loop closes: the export writes the confirmed defect, its image and its mask, in MVTec layout
    out = tmp_path / "export"
    (summary,) = export_feedback(live.served.log, out)
    assert (summary.model, summary.defects, summary.good, summary.marked) == (MODEL, 1, 0, 1)
    image = out / MODEL / "test" / "broken_large" / f"{defect_id}.png"
    exported_mask = out / MODEL / "ground_truth" / "broken_large" / f"{defect_id}_mask.png"
    assert image.read_bytes() == BROKEN.read_bytes()
    assert np.array_equal(np.asarray(Image.open(exported_mask).convert("L")) > 127, mask)


def test_login_box_and_rejected_upload(page: Any, live_serve: LiveServer, tmp_path: Path) -> None:
    live = live_serve
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not a picture\n")
    with httpx.Client(base_url=live.url, headers=live.headers, timeout=30) as client:
        resp = _api_inspect(client, bad)
    assert resp.status_code == 422
    detail = resp.json()["detail"]

    # no token: the sign-in box; a wrong token is refused there, the right one opens the page
    page.goto(live.url + "/")
    page.locator("#login").wait_for(state="visible")
    page.fill("#login-token", "not-the-token")
    page.click("#login-form button[type=submit]")
    page.locator("#login-msg", has_text="refused").wait_for()
    assert page.locator("#app").is_hidden()
    page.fill("#login-token", str(live.token))
    page.press("#login-token", "Enter")
    page.wait_for_selector(f"#models input[value='{MODEL}']")
    assert page.locator("#login").is_hidden()

    # a file the service cannot decode: the API's one-line reason next to the file name, no silent failure
    page.set_input_files("#files", [str(bad)])
    card = page.locator("#results .card.failed[data-filename='notes.png']")
    card.wait_for()
    assert card.locator(".fname").inner_text() == "notes.png"
    assert card.locator(".reason").inner_text() == f"422: {detail}"

    # the token stops working (a new one on the server, another tab signed out): the sign-in box comes back
    page.evaluate("sessionStorage.setItem('defectscope.token', 'revoked')")
    page.reload()
    page.locator("#login").wait_for(state="visible")
    if SHOTS:
        page.set_viewport_size({"width": 390, "height": 844})
        page.fill("#login-token", str(live.token))
        page.press("#login-token", "Enter")
        page.wait_for_selector(f"#models input[value='{MODEL}']")
        page.set_input_files("#files", [str(GOOD), str(bad)])
        page.wait_for_function("() => document.querySelectorAll('#results .card.pending').length === 0")
        page.locator("#history tbody tr").first.wait_for()
        page.wait_for_function("() => document.querySelector('#results .card[data-id] .thumb img').naturalWidth > 0")
        _shot(page, "narrow", full_page=True)


def test_the_page_with_the_onnxruntime_engine(page: Any, serve_run: Path, tmp_path: Path) -> None:
    """``serve --engine onnxruntime``: the page shows the verdicts the API gives, and the scores are torch's."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install defectscope[onnx])")
    from defectscope.engines import EngineChoice
    from defectscope.runs import predict_run
    from defectscope.serve.registry import ModelRegistry
    from serve_helpers import live_server, make_app

    registry = ModelRegistry.from_specs([str(serve_run)], engine=EngineChoice("onnxruntime"))
    served = make_app(registry, tmp_path)
    torch_scores = {Path(r.path).name: r.score for r in predict_run(serve_run, [GOOD, BROKEN]).records}
    try:
        with live_server(served) as live, httpx.Client(base_url=live.url, headers=live.headers, timeout=30) as client:
            models = client.get("/v1/models").json()
            assert [m["engine"]["engine"] for m in models] == ["onnxruntime"]
            expected = {}
            for path in (GOOD, BROKEN):
                body = _api_inspect(client, path).json()
                expected[path.name] = body["verdict"]
                assert body["score"] == pytest.approx(torch_scores[path.name], rel=1e-4)
            _open_page(page, live)
            page.check(f"#models input[value='{MODEL}']")
            page.set_input_files("#files", [str(GOOD), str(BROKEN)])
            page.wait_for_function("() => document.querySelectorAll('#results .card[data-id]').length === 2")
            for path in (GOOD, BROKEN):
                card = page.locator(f"#results .card[data-filename='{path.name}']")
                assert card.get_attribute("data-verdict") == expected[path.name]
            assert "onnxruntime" in page.locator(f".model[data-model='{MODEL}'] .model-meta").inner_text()
            _shot(page, "onnxruntime")
    finally:
        served.log.close()
