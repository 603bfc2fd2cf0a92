"""Nothing lost: a ``defectscope serve`` killed with SIGKILL under load keeps every inspection it acknowledged.

The server runs as a real subprocess on a free loopback port with a SQLite log; 8 clients post
images concurrently and record each 200 response; the server is SIGKILLed while they are still
posting, restarted on the same data folder and database, and every acknowledged inspection must
be there with the same score and verdict and its stored image byte for byte. About 15-25 s.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import pytest

from serve_helpers import serve_process

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install defectscope[serve])")


REPO = Path(__file__).resolve().parents[1]
TOKEN = "durability-token-0123456789"
CLIENTS = 8
#: The server is killed once this many responses were acknowledged, and at least this long into the load.
KILL_AFTER_ACKS = 40
KILL_AFTER_S = 1.5


def test_sigkill_under_load_loses_no_acknowledged_inspection(serve_run: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    db_url = f"sqlite:///{tmp_path / 'log.db'}"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}
    images = sorted((REPO / "examples" / "bottle_small" / "test").rglob("*.png"))
    payloads = [p.read_bytes() for p in images]
    acked: list[tuple[str, float | None, str, str]] = []  # id, score, verdict, sha256 of the bytes sent
    refused: list[str] = []  # any answer but 200 (there must be none)
    broken: list[str] = []  # transport errors: the kill
    stop = threading.Event()

    with serve_process([serve_run], data_dir, db_url=db_url, token_file=token_file, timeout=60) as server:
        inspect_url = f"{server.url}/v1/models/{serve_run.name}/inspect"

        def client(k: int) -> None:
            with httpx.Client(timeout=30) as http:
                i = k
                while not stop.is_set():
                    data = payloads[i % len(payloads)]
                    i += CLIENTS
                    try:
                        response = http.post(
                            inspect_url, content=data, headers=headers, params={"filename": f"{i}.png"}
                        )
                    except httpx.TransportError as exc:
                        broken.append(type(exc).__name__)
                        return
                    if response.status_code != 200:
                        refused.append(f"{response.status_code} {response.text[:200]}")
                        continue
                    body = response.json()
                    acked.append((body["id"], body["score"], body["verdict"], hashlib.sha256(data).hexdigest()))

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while len(acked) < KILL_AFTER_ACKS or time.monotonic() - started < KILL_AFTER_S:
            assert time.monotonic() - started < 20 and not refused, f"{len(acked)} acknowledged; {refused[:1]}"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGKILL)  # mid-load: the clients are still posting
        server.process.wait(timeout=30)
        for thread in threads:
            thread.join(timeout=30)
        stop.set()
    assert not refused, refused[:3]
    assert len(acked) >= KILL_AFTER_ACKS, f"only {len(acked)} inspections acknowledged before the kill"
    assert broken, "the clients never noticed the kill: it was not under load"

    with (
        serve_process([serve_run], data_dir, db_url=db_url, token_file=token_file, timeout=60) as server,
        httpx.Client(timeout=30) as http,
    ):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for inspection_id, score, verdict, digest in acked:
            response = http.get(f"{server.url}/v1/inspections/{inspection_id}", headers=auth)
            assert response.status_code == 200, f"acknowledged inspection {inspection_id} lost: {response.text}"
            row = response.json()
            assert row["score"] == score and row["verdict"] == verdict and row["model"] == serve_run.name
            image = http.get(f"{server.url}/v1/inspections/{inspection_id}/image", headers=auth)
            assert image.status_code == 200 and hashlib.sha256(image.content).hexdigest() == digest
        listed = http.get(f"{server.url}/v1/inspections", headers=auth, params={"limit": 1}).json()
        assert listed["total"] >= len(acked)  # also rows whose response the kill cut off
