"""The `celery_ext` section of `inspect stats`, Prometheus `/metrics` and `celery ext status`
on real workers: embedded on the local lane, Redis and RabbitMQ; a prefork `celery worker`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

import celery_ext
from celery_ext import metrics
from tests.helpers import broker_url, embedded_worker, ext_section, new_app, wait_for
from tests.test_shutdown import ROOT, Run


@pytest.fixture(params=["local", "redis", "amqp"])
def app(request: pytest.FixtureRequest, unique_queue: str) -> Iterator[Celery]:
    kind = request.param
    app = new_app(broker_url(request, kind), unique_queue)
    celery_ext.install(app, prefetch_limit=40, dead_letter_queue=f"{unique_queue}.dlq")
    yield app
    if kind != "local":
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(unique_queue)
            conn.default_channel.queue_delete(f"{unique_queue}.dlq")
            if kind == "amqp":
                conn.default_channel.exchange_delete(unique_queue)


def test_the_section_counts_outcomes_and_shows_limits_and_drain_state(app: Celery) -> None:
    @app.task(shared=False, name=f"m.ok.{uuid.uuid4().hex[:6]}")
    def ok() -> str:
        return "ok"

    @app.task(shared=False, name=f"m.bad.{uuid.uuid4().hex[:6]}")
    def bad() -> None:
        raise ValueError("bad")

    @app.task(shared=False, name=f"m.slow.{uuid.uuid4().hex[:6]}", soft_timeout=0.2, timeout=5)
    def slow() -> None:
        time.sleep(3)

    with embedded_worker(app) as w:
        for _ in range(3):
            assert ok.delay().get(timeout=20) == "ok"
        for task in (bad, slow):
            with pytest.raises(Exception):  # noqa: B017 - ValueError, TaskTimeout
                task.delay().get(timeout=20)

        def section() -> dict[str, Any]:
            found: dict[str, Any] = ext_section(app, w.hostname)
            return found

        wait_for(lambda: section()["tasks"]["failed"] == 2)
        found = section()
    assert found["tasks"] == {
        "succeeded": 3,
        "failed": 2,
        "retried": 0,
        "dead_lettered": 0,
        "soft_timeouts": 1,
        "hard_timeouts": 0,
        "handed_back": 0,
    }
    assert found["prefetch_limit"] == 40 and found["held"] == 0 and found["active"] == 0
    assert found["drain"]["state"] == "running" and found["drain"]["drain_timeout_s"] > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "worker"))): (
            sample.value
        )
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prefork_metrics_and_status_count_what_the_children_ran(
    redis_url: str, unique_queue: str
) -> None:
    run = Run(redis_url, redis_url, unique_queue, "prefork")
    port = free_port()
    try:
        run.start("--metrics-port", str(port), "--prefetch-limit", "30", "--time-limit", "60")
        section = ext_section(run.app, run.hostname)
        assert section["timeouts"] == {"time_limit": 60.0, "soft_time_limit": None}
        before = scrape(port)
        assert before[("celery_ext_prefetch_limit", ())] == 30
        assert before[("celery_ext_tasks_total", (("outcome", "succeeded"),))] == 0
        assert before[("celery_ext_draining", ())] == 0
        for n in range(5):
            run.send(n, 0.01)
        succeeded = ("celery_ext_tasks_total", (("outcome", "succeeded"),))
        wait_for(lambda: scrape(port)[succeeded] == 5)
        env = dict(run.env)
        status = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.apps.drain_app", "ext", "status"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        header, *lines = status.stdout.splitlines()
        assert header.split()[:3] == ["WORKER", "HELD/LIMIT", "RUNNING"]
        mine = [line.split() for line in lines if line.startswith(run.hostname)]
        assert mine and mine[0][1] == "0/30" and mine[0][5] == "5"
        assert mine[0][-2:] == ["running", "redis"]  # drain state, then the broker setup
    finally:
        run.cleanup()


def test_soft_timeouts_and_dead_letters_are_sent_as_events(app: Celery, unique_queue: str) -> None:
    app.conf.worker_send_task_events = True
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    done = threading.Event()

    def listen() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": seen.append})
            ready.set()
            while not done.is_set():
                try:  # capture ends at the first quiet half second: go on until done
                    for _ in receiver.itercapture(limit=None, timeout=0.5, wakeup=False):
                        if done.is_set():
                            return
                except TimeoutError:
                    continue

    @app.task(shared=False, name=f"m.slow.{uuid.uuid4().hex[:6]}", soft_timeout=0.2, timeout=5)
    def slow() -> None:
        time.sleep(3)

    @app.task(shared=False, name=f"m.dead.{uuid.uuid4().hex[:6]}")
    @celery_ext.retry(attempts=1)
    def doomed() -> None:
        raise ValueError("no")

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        assert ready.wait(10)
        with embedded_worker(app):
            slow_id, doomed_id = slow.delay().id, doomed.delay().id

            def by_type(kind: str, task_id: str) -> list[dict[str, Any]]:
                return [e for e in seen if e["type"] == kind and e.get("uuid") == task_id]

            wait_for(lambda: by_type("task-soft-timeout", slow_id), timeout=20)
            wait_for(lambda: by_type("task-dead-lettered", doomed_id), timeout=20)
    finally:
        done.set()
        listener.join(5)
    assert by_type("task-soft-timeout", slow_id)[0]["limit"] == 0.2
    dead = by_type("task-dead-lettered", doomed_id)[0]
    assert dead["reason"] == "attempts" and dead["attempts"] == 1
    assert dead["queue"] == f"{unique_queue}.dlq"


def test_a_drain_is_sent_as_worker_events(redis_url: str, unique_queue: str) -> None:
    run = Run(redis_url, redis_url, unique_queue)
    seen: list[dict[str, Any]] = []
    receivers: list[Any] = []

    def listen() -> None:
        # One subscription for the whole test: events are pub/sub on Redis, and a
        # receiver re-subscribing between timeouts misses what is sent in the gap.
        with run.app.connection_for_read() as conn:
            receiver = run.app.events.Receiver(conn, handlers={"*": seen.append})
            receivers.append(receiver)
            for _ in receiver.consume(limit=None, timeout=None, safety_interval=0.2):
                pass

    def of(kind: str) -> list[dict[str, Any]]:
        return [e for e in list(seen) if e["type"] == kind and e.get("hostname") == run.hostname]

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        run.start("-E", "--drain-timeout", "20")
        # Subscribed before the drain: the worker's own heartbeat (every 2 s with -E) got in.
        wait_for(lambda: of("worker-heartbeat") or of("worker-online"), timeout=20)
        run.send(0, 1.0)
        wait_for(lambda: run.started() == {0})
        assert run.proc is not None
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(30) == 0
        wait_for(lambda: of("worker-celery_ext-drain-finished"), timeout=10)
    finally:
        for receiver in receivers:
            receiver.should_stop = True
        listener.join(5)
        run.cleanup()
    assert of("worker-celery_ext-drain-started")[0]["drain_timeout_s"] == 20
    finished = of("worker-celery_ext-drain-finished")[0]
    assert (finished["completed"], finished["requeued"], finished["abandoned"]) == (1, 0, 0)


@pytest.mark.parametrize("kind", ["local", "redis", "amqp"])
def test_parked_tasks_are_sent_as_events_until_they_come_back(
    request: pytest.FixtureRequest, kind: str, unique_queue: str
) -> None:
    """Flower shows the custom ``task-parked`` as state PARKED (with ``eta``), and
    ``task-unparked`` when the task is back: Celery's received/started events cannot
    replace a state Celery does not know. Parked by the producer (sent events on),
    and, on Redis and RabbitMQ, by a worker receiving a stock producer's far ETA."""
    url = broker_url(request, kind)
    app = new_app(url, unique_queue, worker_send_task_events=True, task_send_sent_event=True)
    celery_ext.install(app, eta_horizon=1)
    name = f"m.later.{uuid.uuid4().hex[:6]}"

    @app.task(shared=False, name=name)
    def later() -> str:
        return "done"

    seen: list[dict[str, Any]] = []
    receivers: list[Any] = []

    def listen() -> None:  # one subscription for the whole test (see the drain test)
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": seen.append})
            receivers.append(receiver)
            for _ in receiver.consume(limit=None, timeout=None, safety_interval=0.2):
                pass

    def of(task_id: str) -> list[str]:
        return [e["type"] for e in list(seen) if e.get("uuid") == task_id]

    def first(event: str, task_id: str) -> dict[str, Any]:
        return next(e for e in list(seen) if e["type"] == event and e.get("uuid") == task_id)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        wait_for(lambda: receivers, timeout=10)
        with embedded_worker(app) as w:
            wait_for(lambda: later.delay().get(timeout=10) == "done", timeout=20)  # subscribed
            by_producer = later.apply_async(countdown=2).id
            ids = [by_producer]
            if kind != "local":  # a producer without celery_ext queues it: the worker parks it
                stock = Celery("stock", broker=url, set_as_current=False)
                ids.append(stock.send_task(name, countdown=3, queue=unique_queue).id)
            for task_id in ids:
                wait_for(lambda t=task_id: "task-succeeded" in of(t), timeout=40)
            worker_host = w.hostname
            # The worker parked the stock producer's message, not celery_ext's.
            assert ext_section(app, worker_host)["parked_total"] == len(ids) - 1
    finally:
        for receiver in receivers:
            receiver.should_stop = True
        listener.join(5)
        if kind == "redis":
            with app.connection_for_write() as conn:
                conn.default_channel.client.hdel(
                    "celery_ext.parked", f"celery_ext.parked:{unique_queue}"
                )
    for task_id in ids:
        kinds = of(task_id)
        assert kinds.index("task-parked") < kinds.index("task-unparked"), kinds
        assert kinds.index("task-unparked") < kinds.index("task-started"), kinds
        parked, back = first("task-parked", task_id), first("task-unparked", task_id)
        assert parked["eta"] and parked["eta"] == back["eta"], (parked, back)
        assert back["hostname"] == worker_host


def test_stats_rows_are_flat_and_nest_back_into_the_section() -> None:
    section = {
        "held": 3,
        "queue_limits": {"emails.high": 100},  # a queue name with a dot stays one key
        "drain": {"state": "drained", "drain_timeout_s": 30.0, "last": {"completed": 2}},
    }
    rows = metrics.stats_rows(section)
    assert rows == {
        "celery_ext.held": 3,
        "celery_ext.queue_limits": {"emails.high": 100},
        "celery_ext.drain": {"state": "drained", "drain_timeout_s": 30.0},
        "celery_ext.drain.last": {"completed": 2},
    }
    assert celery_ext.stats_section({"pid": 1, **rows}) == section
    assert celery_ext.stats_section({"pid": 1}) is None  # a worker without celery_ext
