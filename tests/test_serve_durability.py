"""Nothing lost: a ``defectscope serve`` killed with SIGKILL under load keeps every inspection it acknowledged.

The server runs as a real subprocess on a free loopback port with a SQLite log; 8 clients post
images concurrently and record each 200 response; the server is SIGKILLed while they are still
posting, restarted on the same data folder and database, and every acknowledged inspection must
be there with the same score and verdict and its stored image byte for byte. About 15-25 s.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install defectscope[serve])")


REPO = Path(__file__).resolve().parents[1]
TOKEN = "durability-token-0123456789"
CLIENTS = 8
#: The server is killed once this many responses were acknowledged, and at least this long into the load.
KILL_AFTER_ACKS = 40
KILL_AFTER_S = 1.5


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    stderr: list[str]


@contextmanager
def serve(run: Path, data_dir: Path, db_url: str, token_file: Path, timeout: float = 60.0) -> Iterator[Server]:
    """``defectscope serve RUN --port 0`` as a subprocess; its URL read from the line it prints."""
    argv = ["serve", str(run), "--port", "0", "--db", db_url, "--data-dir", str(data_dir)]
    argv += ["--token-file", str(token_file)]
    env = {**os.environ, "DEFECTSCOPE_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "defectscope.cli", *argv],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: list[str] = []
    found = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if " at http://" in line:
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the server did not start: " + " | ".join(lines))
        match = next(m for m in map(re.compile(r"at (http://[^/ ]+)/").search, lines) if m)
        server = Server(proc, match.group(1), lines)
        while httpx.get(f"{server.url}/healthz", timeout=5).status_code != 200:  # listening once it printed
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


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

    with serve(serve_run, data_dir, db_url, token_file) as server:
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
        server.proc.send_signal(signal.SIGKILL)  # mid-load: the clients are still posting
        server.proc.wait(timeout=30)
        for thread in threads:
            thread.join(timeout=30)
        stop.set()
    assert not refused, refused[:3]
    assert len(acked) >= KILL_AFTER_ACKS, f"only {len(acked)} inspections acknowledged before the kill"
    assert broken, "the clients never noticed the kill: it was not under load"

    with serve(serve_run, data_dir, db_url, token_file) as server, httpx.Client(timeout=30) as http:
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
