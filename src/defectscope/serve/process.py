"""``defectscope serve`` in a child process, for tests, benches and scripts that talk to a real server.

:func:`start_serve` runs ``python -m defectscope.cli serve ARGS`` with this interpreter, waits for the
line it prints once it listens (``serving NAMES at http://HOST:PORT/ ...``) and for ``/healthz`` to
answer, and returns a :class:`ServeChild`: the base URL, the port, the process and its stderr so far.
:meth:`ServeChild.stop` ends it as a service manager would (SIGTERM: drain, close the log).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: The base URL in the line ``defectscope serve`` prints once its socket listens.
_LISTENING = re.compile(r" at (http://\S+?)/ ")


class ServeStartError(RuntimeError):
    """The child exited, or did not answer in time; the message ends with what it wrote to stderr."""


@dataclass
class ServeChild:
    """A started ``defectscope serve``: its base URL (no trailing slash), the process and its stderr."""

    url: str
    process: subprocess.Popen[str]
    #: Its stderr lines so far (without the newline); complete once :meth:`stop` returned.
    stderr: list[str]
    drain: threading.Thread = field(repr=False)

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None  # the URL the command prints always has one
        return port

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server drains and closes its log), SIGKILL after ``timeout``; the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        status = self.process.wait()
        self.drain.join(5)
        return status


def start_serve(
    args: Sequence[str | os.PathLike[str]], *, timeout: float = 120.0, env: Mapping[str, str] | None = None
) -> ServeChild:
    """Start ``defectscope serve ARGS`` (give ``--port 0`` for a free port) and wait until it answers.

    The child gets this environment plus ``DEFECTSCOPE_NO_PROGRESS=1``, ``PYTHONUNBUFFERED=1`` and
    ``env``; its stdout is discarded, its stderr collected in :attr:`ServeChild.stderr`. Raises
    :class:`ServeStartError` (the child stopped) where it exits or does not answer within ``timeout`` s.
    """
    command = [sys.executable, "-m", "defectscope.cli", "serve", *map(str, args)]
    environment = {**os.environ, "DEFECTSCOPE_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=environment,
    )
    lines: list[str] = []
    urls: list[str] = []
    printed = threading.Event()  # the URL line, or the end of stderr (the child exited)

    def drain() -> None:  # also keeps the pipe from filling up while the server runs
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            found = None if urls else _LISTENING.search(line)
            if found:
                urls.append(found.group(1))
                printed.set()
        printed.set()

    thread = threading.Thread(target=drain, name="defectscope-serve-stderr", daemon=True)
    thread.start()
    child = ServeChild("", process, lines, thread)
    deadline = time.monotonic() + timeout
    try:
        if not printed.wait(timeout) or not urls:
            raise ServeStartError(_failure(child, timeout))
        child.url = urls[0]
        _wait_answering(child, deadline, timeout)
    except BaseException:
        child.stop()
        raise
    return child


def _wait_answering(child: ServeChild, deadline: float, timeout: float) -> None:
    """Until ``GET /healthz`` is 200 (it is served without a token); a ServeStartError after ``deadline``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    while True:
        try:
            with opener.open(f"{child.url}/healthz", timeout=max(deadline - time.monotonic(), 0.1)) as answer:
                if answer.status == 200:
                    return
        except OSError:  # not yet (URLError, HTTPError, a reset or a timeout)
            pass
        if child.process.poll() is not None or time.monotonic() > deadline:
            raise ServeStartError(_failure(child, timeout))
        time.sleep(0.05)


def _failure(child: ServeChild, timeout: float) -> str:
    status = child.process.poll()
    if status is None and not child.drain.is_alive():  # its stderr ended: it is exiting
        with contextlib.suppress(subprocess.TimeoutExpired):
            status = child.process.wait(5)
    if status is None:
        what = f"did not answer within {timeout:g} s"
    else:
        child.drain.join(5)  # the rest of what it said
        what = f"exited with status {status}"
    return f"defectscope serve {what}: {' | '.join(child.stderr) or '(nothing on stderr)'}"
