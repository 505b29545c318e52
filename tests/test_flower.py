"""Flower as a separate process shows a real worker's celery_ext stats section.

A `celery worker` (threads, -E, --prefetch-limit 50) and `celery flower` run as
subprocesses on Redis; Flower's API must return the worker's ``celery_ext``
stats, and its worker page, rendered in headless Chromium, must show them (under
the "Other" tab). Without Chromium the page check skips, or fails when
CELERY_EXT_REQUIRE_CHROMIUM=1 (set by .ci/run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from kombu import Connection

ROOT = Path(__file__).parent.parent
APP = "tests.apps.flower_app"
PREFETCH_LIMIT = 50
T = TypeVar("T")


class Service:
    """A subprocess whose output goes to a log file, shown when the test fails."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=out)

    def output(self, chars: int = 4000) -> str:
        return (
            f"--- {self.name} output (tail) ---\n" + self.log.read_text(errors="replace")[-chars:]
        )

    def assert_running(self) -> None:
        code = self.proc.poll()
        assert code is None, f"{self.name} exited with {code}\n{self.output()}"

    def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)


@contextmanager
def service(
    name: str, cmd: list[str], env: dict[str, str], log: Path, stop_s: float
) -> Iterator[Service]:
    s = Service(name, cmd, env, log)
    try:
        yield s
    finally:
        s.stop(stop_s)


def poll(what: str, check: Callable[[], T | None], timeout: float, *alive: Service) -> T:
    """Poll ``check`` until it returns a truthy value; fail at once if a service died."""
    deadline = time.monotonic() + timeout
    while True:
        for s in alive:
            s.assert_running()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(s.output() for s in alive)
            raise AssertionError(f"{what}: not within {timeout}s\n{logs}")
        time.sleep(0.1)


def http_get(url: str) -> tuple[int, str] | None:
    """Status and body, or None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def chromium_or_skip() -> str:
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium is not installed: Flower's API passed, its page is not checked"
        if os.environ.get("CELERY_EXT_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"{reason} and CELERY_EXT_REQUIRE_CHROMIUM=1", pytrace=False)
        pytest.skip(reason)
    return path


def render(chromium: str, url: str, profile: Path) -> str:
    """The DOM of ``url`` after headless Chromium loaded it and ran its scripts."""
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", "--dump-dom", url,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    dom = done.stdout.decode(errors="replace")
    assert done.returncode == 0 and "<html" in dom, (
        f"chromium exited with {done.returncode}\n{done.stderr.decode(errors='replace')[-4000:]}"
    )
    return dom


@pytest.fixture
def hostname() -> str:
    return f"flower-{uuid.uuid4().hex[:6]}@localhost"


@pytest.fixture
def queue(redis_url: str, unique_queue: str, hostname: str) -> Iterator[str]:
    """The worker's queue; afterwards its list, bindings and the worker's leases are deleted."""
    yield unique_queue
    with Connection(redis_url) as conn:
        conn.default_channel.queue_delete(unique_queue)
    client = redis.Redis.from_url(redis_url)
    client.delete(f"_kombu.binding.{unique_queue}", f"_kombu.binding_permanent.{unique_queue}")
    for key in client.scan_iter(f"celery_ext.lease.*:{hostname}:*"):
        client.delete(key)


def test_flower_shows_the_celery_ext_stats_of_a_real_worker(
    redis_url: str, queue: str, hostname: str, tmp_path: Path
) -> None:
    env = dict(
        os.environ,
        CELERY_EXT_TEST_BROKER=redis_url,
        CELERY_EXT_TEST_QUEUE=queue,
        FLOWER_UNAUTHENTICATED_API="true",
        PYTHONUNBUFFERED="1",
    )
    celery = [sys.executable, "-m", "celery", "-A", APP]
    worker_cmd = [
        *celery, "worker", "-P", "threads", "-c", "2", "-E",
        "--prefetch-limit", str(PREFETCH_LIMIT), "-n", hostname, "-Q", queue,
        "--without-mingle", "--without-gossip", "-l", "WARNING",
    ]  # fmt: skip
    port = free_port()
    flower_cmd = [*celery, "flower", "--address=127.0.0.1", f"--port={port}"]
    url = f"http://127.0.0.1:{port}"

    with (
        service("worker", worker_cmd, env, tmp_path / "worker.log", stop_s=30) as worker,
        service("flower", flower_cmd, env, tmp_path / "flower.log", stop_s=10) as flower,
    ):
        poll(
            "Flower's /healthcheck",
            lambda: http_get(url + "/healthcheck") == (200, "OK"),
            60,
            flower,
        )

        last: dict[str, Any] = {}

        def celery_ext_stats() -> dict[str, Any] | None:
            # Only our worker is inspected: other tests' workers share this Redis db.
            got = http_get(f"{url}/api/workers?workername={hostname}&refresh=1")
            if got is None or got[0] != 200:
                return None  # 404 until the worker answered Flower's inspect
            last.update(json.loads(got[1]).get(hostname, {}))
            section: dict[str, Any] | None = last.get("stats", {}).get("celery_ext")
            return section

        try:
            section = poll("celery_ext stats in Flower's API", celery_ext_stats, 60, worker, flower)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast reply for {hostname}: {last}") from None
        assert section["prefetch_limit"] == PREFETCH_LIMIT, section
        assert section.get("drain", {}).get("state") == "running", section

        chromium = chromium_or_skip()
        dom = render(chromium, f"{url}/worker/{hostname}", tmp_path / "chromium")
        assert hostname in dom, dom[-4000:]
        # Flower lists stats keys it does not know in its "Other" tab, one row each; the
        # row's value is the section's Python repr (nested dicts included).
        assert 'id="tab-other"' in dom, dom[-4000:]
        other = dom[dom.index('id="tab-other"') :]
        assert "<td>celery_ext</td>" in other, other[:4000]
        row = other[other.index("<td>celery_ext</td>") :].split("</tr>")[0]
        assert "prefetch_limit" in row, row
        # The Broker tab lists the transport options: celery_ext's read as text, never
        # as an object's repr ("<Bounds 0x7f...>").
        broker = dom[dom.index('id="tab-broker"') :].split("end broker tab")[0]
        assert "celery_ext local lanes:" in broker and "celery_ext queue limits:" in broker, broker
        reprs = [dom[m.start() - 300 : m.end()] for m in re.finditer(r"&lt;\w+ 0x[0-9a-f]+", dom)]
        assert not reprs, reprs
        assert "celery_ext task options (timeouts" in dom  # Config tab: task_annotations
