"""Flower as a separate process, read as a person reads it: pages rendered in Chromium.

A `celery worker` (threads, -E, --prefetch-limit 50) and `celery flower` run as
subprocesses on Redis; this process publishes with celery_ext installed and
``task_send_sent_event`` on. Flower's worker page, rendered in headless
Chromium, must list celery_ext's state as short flat rows (tab "Other") and no
object repr; a dead-lettered task's page must say why and after how many
attempts; a parked task shows PARKED with its due time, and UNPARKED once it is
back and running. Screenshots go to ``test-artifacts/`` (or
``$CELERY_EXT_ARTIFACTS``). Without Chromium the page checks skip, or fail when
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
from html import unescape
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from celery import Celery
from kombu import Connection

import celery_ext

ROOT = Path(__file__).parent.parent
APP = "tests.apps.flower_app"
PREFETCH_LIMIT = 50
NOTES = sys.version_info >= (3, 11)  # a dead-lettered failure's note needs exception notes
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


def alive(reply: tuple[int, str] | None, hostname: str) -> bool:
    """Whether Flower's ``/api/workers?status=1`` reply has ``hostname`` online."""
    return reply is not None and reply[0] == 200 and json.loads(reply[1]).get(hostname) is True


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


def _chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    assert done.returncode == 0, (
        f"chromium exited with {done.returncode}\n{done.stderr.decode(errors='replace')[-4000:]}"
    )
    return done


def render(chromium: str, url: str, profile: Path) -> str:
    """The DOM of ``url`` after headless Chromium loaded it and ran its scripts."""
    dom = _chromium(chromium, profile, "--dump-dom", url).stdout.decode(errors="replace")
    assert "<html" in dom, dom[-4000:]
    return dom


def screenshot(chromium: str, url: str, profile: Path, name: str) -> Path:
    """A PNG of ``url`` kept as a test artifact; its path."""
    folder = Path(os.environ.get("CELERY_EXT_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.unlink(missing_ok=True)
    _chromium(
        chromium, profile, "--window-size=1280,2000", "--virtual-time-budget=3000",
        "--force-prefers-reduced-motion",
        f"--screenshot={path}", url,
    )  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return path


def text_of(html: str) -> str:
    """The visible text of an HTML fragment, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def other_rows(dom: str) -> dict[str, str]:
    """Name and shown value of each row of the worker page's "Other" tab."""
    tab = dom[dom.index('id="tab-other"') :].split("end other tab")[0]
    cells = re.findall(r"<td[^>]*>(.*?)</td>\s*<td[^>]*>(.*?)</td>", tab, re.S)
    return {text_of(name): unescape(text_of(value)) for name, value in cells}


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
    client.delete(f"celery_ext.parked:{unique_queue}")  # the task parked for an hour
    client.hdel("celery_ext.parked", f"celery_ext.parked:{unique_queue}")
    for key in client.scan_iter(f"celery_ext.lease.*:{hostname}:*"):
        client.delete(key)


def test_flower_shows_celery_ext_state_and_dead_lettered_and_parked_tasks(
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
    # A producer as a web app is one: celery_ext installed, sent events on (Flower
    # lists tasks from publish on), ETAs beyond 1 s parked at publish.
    producer = Celery("flower_producer", broker=redis_url, set_as_current=False)
    producer.conf.update(task_default_queue=queue, task_send_sent_event=True)
    celery_ext.install(producer, eta_horizon=1)

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
            return celery_ext.stats_section(last.get("stats", {}))

        try:
            section = poll("celery_ext stats in Flower's API", celery_ext_stats, 60, worker, flower)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast reply for {hostname}: {last}") from None
        assert section["prefetch_limit"] == PREFETCH_LIMIT, section
        assert section["drain"]["state"] == "running", section

        # Flower subscribes to events from a thread of its own: wait until it has
        # this worker's (its heartbeats), or the first task events could be missed.
        poll(
            "the worker's events in Flower",
            lambda: alive(http_get(f"{url}/api/workers?status=1"), hostname),
            60,
            worker,
            flower,
        )
        doomed = producer.send_task("flower_app.doomed").id
        parked = producer.send_task("flower_app.pause", args=[0], countdown=3600).id
        back = producer.send_task("flower_app.pause", args=[3], countdown=2).id

        def task(task_id: str, *states: str) -> dict[str, Any] | None:
            got = http_get(f"{url}/api/task/info/{task_id}")
            info: dict[str, Any] = json.loads(got[1]) if got and got[0] == 200 else {}
            return info if info.get("state") in states else None

        # Back from parking and running: UNPARKED (Celery's received and started
        # events cannot replace a state they do not know), then SUCCESS.
        def unparked_running() -> dict[str, Any] | None:
            info = task(back, "UNPARKED")
            return info if info and info["started"] is not None else None

        poll("the unparked task running", unparked_running, 60, worker)
        poll("the unparked task done", lambda: task(back, "SUCCESS"), 30, worker)
        shelved = poll("the parked task", lambda: task(parked, "PARKED"), 30, worker, flower)
        assert shelved["eta"] and shelved["received"] is None, shelved
        failed = poll("the dead-lettered task", lambda: task(doomed, "FAILURE"), 30, worker)
        if NOTES:
            assert "dead-lettered after 2 attempt(s) (attempts)" in failed["traceback"], failed

        # The worker counted them: what the worker page shows from here on.
        poll(
            "the outcomes in the worker's stats",
            lambda: (celery_ext_stats() or {}).get("tasks", {}).get("dead_lettered") == 1,
            30,
            worker,
        )

        chromium = chromium_or_skip()
        profile = tmp_path / "chromium"
        dom = render(chromium, f"{url}/worker/{hostname}", profile)
        screenshot(chromium, f"{url}/worker/{hostname}#tab-other", profile, "flower-worker.png")
        assert hostname in dom, dom[-4000:]
        rows = {k: v for k, v in other_rows(dom).items() if k.startswith("celery_ext")}
        # Several short rows, one figure or one flat group each.
        assert rows.get("celery_ext.prefetch_limit") == str(PREFETCH_LIMIT), rows
        assert rows.get("celery_ext.held", "").isdigit(), rows
        assert "'succeeded': 1" in rows.get("celery_ext.tasks", ""), rows
        assert "'dead_lettered': 1" in rows.get("celery_ext.tasks", ""), rows
        assert "'state': 'running'" in rows.get("celery_ext.drain", ""), rows
        assert len(rows) >= 10 and all(len(v) <= 200 for v in rows.values()), rows
        assert not [v for v in rows.values() if re.search(r"\{[^}]*\{", v)], rows  # flat
        # The Broker tab lists the transport options: celery_ext's read as text, never
        # as an object's repr ("<Bounds 0x7f...>"); nor anywhere else on the page.
        broker = dom[dom.index('id="tab-broker"') :].split("end broker tab")[0]
        assert "celery_ext local lanes:" in broker and "celery_ext queue limits:" in broker, broker
        reprs = [dom[m.start() - 300 : m.end()] for m in re.finditer(r"&lt;\w+ 0x[0-9a-f]+", dom)]
        assert not reprs, reprs
        assert "celery_ext task options (timeouts" in dom  # Config tab: task_annotations

        page = text_of(render(chromium, f"{url}/task/{doomed}", profile))
        screenshot(chromium, f"{url}/task/{doomed}", profile, "flower-dead-lettered-task.png")
        assert "Status FAILURE" in page and "ConnectionError" in page, page
        if NOTES:
            assert "celery_ext: dead-lettered after 2 attempt(s) (attempts); entry in" in page, page

        page = text_of(render(chromium, f"{url}/task/{parked}", profile))
        assert "Status PARKED" in page and re.search(r"ETA \d{4}-\d\d-\d\dT", page), page
