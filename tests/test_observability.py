"""Flower in-process shows the local lane's worker and task events."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

import celery_ext
from celery_ext import LocalWorker, start_flower


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def poll(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
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

        def worker_listed() -> bool:
            _, body = get(flower.url + f"/api/workers?workername={worker.hostname}&refresh=1")
            return worker.hostname in json.loads(body)

        poll(worker_listed)
        status, page = get(flower.url + f"/worker/{worker.hostname}")
        assert status == 200 and worker.hostname in page
