"""The email_service demo runs with one command, sheds load with 503 and drains on SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from time import monotonic
from typing import Any

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "email_service.py"
START_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0


class Demo:
    """The demo as a subprocess; its merged stdout/stderr is read by a thread."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(DEMO), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)  # EOF

    def _wait_for_url(self) -> str:
        deadline = monotonic() + START_TIMEOUT_S
        while (remaining := deadline - monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"demo exited before listening:\n{''.join(self.output)}")
            if match := re.match(r"listening on (http://\S+)", line):
                return match.group(1)
        pytest.fail(f"no 'listening on' line within {START_TIMEOUT_S}s:\n{''.join(self.output)}")

    def wait_for_eof(self, timeout: float) -> str:
        """All the output, once the reader saw EOF (the process closed its stdout)."""
        deadline = monotonic() + timeout
        while (remaining := deadline - monotonic()) > 0:
            try:
                if self.lines.get(timeout=remaining) is None:
                    return "".join(self.output)
            except queue.Empty:
                break
        pytest.fail(f"demo output not closed within {timeout}s:\n{''.join(self.output)}")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any, Any]:
        """(status, parsed JSON body, headers); HTTP errors are answers, not exceptions."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read()), resp.headers
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read()), exc.headers


def raw_status(url: str, head_rest: bytes) -> int:
    """The status of a hand-written POST /emails (headers after Host, then any body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /emails HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head_rest)
        reply = conn.recv(200)
    return int(reply.split(b" ", 2)[1])


@pytest.fixture
def demo() -> Iterator[Demo]:
    started = Demo("--port", "0", "--max-queued", "5", "--concurrency", "1")
    try:
        yield started
    finally:
        if started.proc.poll() is None:
            started.proc.kill()
            started.proc.wait(10)


def test_demo_accepts_sheds_and_drains(demo: Demo) -> None:
    status, body, _ = demo.request("POST", "/emails", b'{"to": "a@example.com", "subject": "hi"}')
    assert status == 202, body
    assert isinstance(body["id"], str) and body["id"]
    assert 0 <= body["queued"] <= 5

    status, burst, _ = demo.request("POST", "/burst?n=50")
    assert status == 200, burst
    assert burst["accepted"] > 0 and burst["rejected"] > 0
    assert burst["accepted"] + burst["rejected"] == 50

    # Single requests while the lane is still full get 503 + Retry-After (it drains at ~5/s).
    email = b'{"to": "b@example.com", "subject": "again"}'
    accepted = 1 + burst["accepted"]
    for _ in range(50):
        status, body, headers = demo.request("POST", "/emails", email)
        if status != 202:
            break
        accepted += 1
    assert status == 503, body
    assert headers["Retry-After"] == "1"
    assert body == {"error": "queue full", "queue": "celery", "limit": 5, "depth": 5}
    rejected = burst["rejected"] + 1

    status, body, _ = demo.request("POST", "/emails", b"{not json")
    assert status == 400 and "error" in body
    status, body, _ = demo.request("POST", "/emails", b'{"to": "a@example.com"}')
    assert status == 400 and "error" in body
    # 5 MB declared: 413 before the body is read (a client still sending sees a reset).
    assert raw_status(demo.url, b"Content-Length: 5242880\r\n\r\n" + b"x" * 1024) == 413
    assert raw_status(demo.url, b"Content-Length: abc\r\n\r\n") == 400
    # A body streamed without a length is cut off once it is too big.
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"  # 16 KiB, then 16 bytes more
    chunked = b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"10\r\n" + b"x" * 16 + b"\r\n"
    assert raw_status(demo.url, chunked + b"0\r\n\r\n") == 413

    status, stats, _ = demo.request("GET", "/stats")
    assert status == 200
    assert stats["accepted"] == accepted
    assert stats["rejected"] == rejected
    assert 0 <= stats["sent"] <= stats["accepted"]
    assert 0 <= stats["queued"] <= 5

    demo.proc.send_signal(signal.SIGTERM)
    try:
        code = demo.proc.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"demo still running {EXIT_TIMEOUT_S}s after SIGTERM")
    output = demo.wait_for_eof(EXIT_TIMEOUT_S)
    assert code == 0, output
    line = (
        r"^drained: sent=(\d+) dropped=(\d+) in \d+\.\ds \(of (\d+) queued or running; (\d+) sent"
    )
    match = re.search(line, output, re.MULTILINE)
    assert match, output
    sent, dropped, pending, total = map(int, match.groups())
    # The drain's own figures: what was waiting when it began was sent or dropped ...
    assert sent + dropped == pending, output
    # ... and every accepted email was sent at some point or reported as dropped.
    assert total + dropped == stats["accepted"], output
