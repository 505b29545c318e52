"""Flower in-process shows the local lane's worker and task events."""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

import celery_ext
from celery_ext import LocalWorker, start_flower, stats_section
from tests.helpers import embedded_worker


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def poll(
    check: Callable[[], Any], timeout: float = 20.0, diagnose: Callable[[], str] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            if diagnose is not None:  # what the worker was doing, then where things are
                import faulthandler
                import sys

                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            where = f": {diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"condition not met within {timeout}s{where}")
        time.sleep(0.1)


def test_flower_in_process_sees_local_lane_workers_and_task_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    app = Celery(f"flower_{uuid.uuid4().hex[:6]}", broker="local://", set_as_current=False)
    app.conf.update(worker_send_task_events=True, worker_hijack_root_logger=False)
    celery_ext.install(app)

    @app.task(shared=False, name="flower.add")
    def add(x: int, y: int) -> int:
        return x + y

    with LocalWorker(app) as worker, start_flower(app, port=0) as flower:
        assert get(flower.url + "/healthcheck") == (200, "OK")
        ids = {add.delay(i, i).id for i in range(3)}
        worker.join(timeout=10)

        def tasks_seen() -> bool:
            _, body = get(flower.url + "/api/tasks")
            tasks = json.loads(body)
            return ids <= set(tasks) and all(tasks[i]["state"] == "SUCCESS" for i in ids)

        poll(tasks_seen)

        def worker_listed() -> dict[str, Any]:
            _, body = get(flower.url + f"/api/workers?workername={worker.hostname}&refresh=1")
            stats = json.loads(body).get(worker.hostname, {}).get("stats", {})
            return stats_section(stats) or {}

        section = poll(worker_listed)  # the celery_ext section of the lane's worker
        assert section["tasks"]["succeeded"] == 3 and section["drain"]["state"] == "running"
        status, page = get(flower.url + f"/worker/{worker.hostname}")
        assert status == 200 and worker.hostname in page and "prefetch_limit" in page


def succeeded_and_received(url: str, task_id: str) -> bool:
    _, body = get(url + "/api/tasks")
    task = json.loads(body).get(task_id) or {}
    return task.get("state") == "SUCCESS" and bool(task.get("received"))


def test_a_task_sent_right_after_start_flower_has_all_its_events(
    monkeypatch: pytest.MonkeyPatch, broker_app: Celery
) -> None:
    # Flower subscribes to events from a thread of its own, after its HTTP server is up:
    # start_flower returns only once it takes them. Before, an event sent at once was
    # missed 10 times in 10 on Redis and 9 in 10 on RabbitMQ.
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    app = broker_app
    app.conf.update(worker_send_task_events=True)

    @app.task(shared=False, name="flower.quick")
    def quick() -> None:
        pass

    with embedded_worker(app):
        for _ in range(3):  # a new Flower each round, a task sent the moment it is up
            with start_flower(app, port=0) as flower:
                task_id = quick.delay().id
                poll(functools.partial(succeeded_and_received, flower.url, task_id), timeout=10)


def test_flower_sees_a_hard_time_limit_as_a_failed_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    app = Celery(f"flower_to_{uuid.uuid4().hex[:6]}", broker="local://", set_as_current=False)
    app.conf.update(worker_send_task_events=True, worker_hijack_root_logger=False)
    celery_ext.install(app)

    @app.task(shared=False, name="flower.stuck", timeout=0.3)
    def stuck() -> None:
        time.sleep(3)  # in C: only the hard limit ends it

    with LocalWorker(app, pool="threads"), start_flower(app, port=0) as flower:
        task_id = stuck.delay().id

        def failed() -> bool:
            _, body = get(flower.url + "/api/tasks")
            task = json.loads(body).get(task_id) or {}
            # Celery's timeout event names the wrapper in "exception" (a stock quirk, on
            # prefork too); the traceback carries TimeLimitExceeded.
            return task.get("state") == "FAILURE" and "TimeLimitExceeded" in str(
                task.get("traceback")
            )

        poll(failed)


def test_flower_shows_a_retry_with_its_reason_and_next_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    app = Celery(f"flower_rt_{uuid.uuid4().hex[:6]}", broker="local://", set_as_current=False)
    app.conf.update(worker_send_task_events=True, worker_hijack_root_logger=False)
    celery_ext.install(app)
    gate = threading.Event()

    @app.task(shared=False, name="flower.flaky")
    @celery_ext.retry(attempts=3, wait=celery_ext.fixed(0.2))
    def flaky() -> str:
        if not gate.is_set():
            gate.set()
            raise ConnectionError("reset by peer")
        return "ok"

    with LocalWorker(app, pool="threads") as worker, start_flower(app, port=0) as flower:
        task_id = flaky.delay().id

        def retried() -> bool:
            _, body = get(flower.url + "/api/tasks")
            task = json.loads(body).get(task_id) or {}
            return bool(task.get("retried")) and task.get("state") == "SUCCESS"

        def where() -> str:
            _, body = get(flower.url + "/api/tasks")
            lane = worker.lane
            return (
                f"flower: {json.loads(body).get(task_id)}; gate: {gate.is_set()}; lane: "
                f"queued {lane.depth('celery')}, parked {lane.parked('celery')}, "
                f"unacked {lane.unacked()}; result: {app.AsyncResult(task_id).state}"
            )

        poll(retried, diagnose=where)
        _, body = get(flower.url + "/api/tasks")
        exception = json.loads(body)[task_id]["exception"]
    assert "ConnectionError: reset by peer; attempt 2 in 0.2s" in exception


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_flower_shows_why_a_task_was_dead_lettered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    app = Celery(f"flower_dl_{uuid.uuid4().hex[:6]}", broker="local://", set_as_current=False)
    app.conf.update(worker_send_task_events=True, worker_hijack_root_logger=False)
    celery_ext.install(app)

    @app.task(shared=False, name="flower.doomed")
    @celery_ext.retry(attempts=2, wait=celery_ext.fixed(0.1))
    def doomed() -> None:
        raise ConnectionError("still down")

    with LocalWorker(app, pool="threads"), start_flower(app, port=0) as flower:
        task_id = doomed.delay().id

        def failed() -> dict[str, Any] | None:
            _, body = get(flower.url + "/api/tasks")
            task: dict[str, Any] = json.loads(body).get(task_id) or {}
            return task if task.get("state") == "FAILURE" else None

        task = poll(failed)
    assert task["exception"] == "ConnectionError('still down')"
    assert "celery_ext: dead-lettered after 2 attempt(s) (attempts)" in task["traceback"], task
